"""Sampler registry: one file per sampler family in this package, each registering a factory.

A factory has the signature `(search_config, seed, space) -> optuna.samplers.BaseSampler`, where
`space` is the round's `efficientllava.search.api.Space` (each parameter's values, levels and
weight, and the budget). Register one with

    @register_sampler("name", multi_objective=False, requires=("package",))
    def make(search, seed, space): ...

Every module of this package is imported on first use, so a new built-in sampler is one new file;
a plug-in registered from any other module works once that module is imported (a test file, say).
`multi_objective=True` samplers search the problem's objectives jointly (fidelity vs kept fraction).
`attribution=True` samplers read each completed trial's per-parameter attributions (the Optuna user
attr `search.api.ATTRIBUTION_ATTR`); the pruning problem computes them only for such a sampler, since
they cost a backward pass per trial.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from efficientllava.errors import ConfigError

if TYPE_CHECKING:
    import optuna

    from efficientllava.search.api import Space

SamplerFactory = Callable[[Any, int, "Space"], "optuna.samplers.BaseSampler"]
INSTALL_HINT = "pip install 'efficientllava[samplers]'"


@dataclass(frozen=True)
class SamplerEntry:
    """A registered sampler: its factory, whether it is multi-objective, what it must import."""

    name: str
    factory: SamplerFactory
    multi_objective: bool = False
    requires: tuple[str, ...] = ()
    attribution: bool = False

    def missing(self) -> list[str]:
        """Required packages that are not installed."""
        return [p for p in self.requires if importlib.util.find_spec(p) is None]


_REGISTRY: dict[str, SamplerEntry] = {}
_loaded = False


def register_sampler(name: str, *, multi_objective: bool = False, requires: tuple[str, ...] = (),
                     attribution: bool = False) -> Callable[[SamplerFactory], SamplerFactory]:
    """Decorator: register `factory` as sampler `name` (a later registration of the name replaces it)."""
    def deco(factory: SamplerFactory) -> SamplerFactory:
        _REGISTRY[name] = SamplerEntry(name, factory, multi_objective, tuple(requires), attribution)
        return factory
    return deco


def _load_builtins() -> None:
    """Import every module of this package once (each registers its samplers)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def sampler_names() -> tuple[str, ...]:
    """Every registered sampler name, sorted."""
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def get_sampler(name: str) -> SamplerEntry:
    """The registered sampler `name`; a ConfigError naming the choices otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"search.sampler={name!r} is not a registered sampler; choose one of "
                          f"{', '.join(sampler_names())}")
    return _REGISTRY[name]


def uses_attribution(name: str) -> bool:
    """Whether sampler `name` reads trial attributions (False for a name not registered in this process)."""
    _load_builtins()
    entry = _REGISTRY.get(name)
    return entry is not None and entry.attribution


def make_sampler(search: Any, seed: int, space: Space) -> optuna.samplers.BaseSampler:
    """The configured sampler for one round; a one-line error when a package it needs is missing."""
    entry = get_sampler(search.sampler)
    missing = entry.missing()
    if missing:
        raise ConfigError(f"search.sampler={entry.name!r} needs the {', '.join(missing)} package"
                          f"{'s' if len(missing) > 1 else ''}: {INSTALL_HINT}")
    return entry.factory(search, seed, space)
