"""The pruning-method seam: a `PruningMethod` base class, its options, and the registry of methods.

A method is one file that subclasses `PruningMethod` (or `NestedMethod`) and is decorated with
`@register_method`. It declares which calibration statistics it needs (`stats`), whether its masks
nest across levels (`nested`), how exact sparsity is counted (`scope`) and its options (a frozen
dataclass, `options_type`). Callers go through `prune_weight`, which validates the sparsity and
pattern once, so a method's `prune` only sees valid inputs.

Calibration is split in two: `prepare` turns one input stream's `LayerStats` (shared by the
linears fed that stream) into the compact tensors the method needs, computed once and reused for
every linear and level; `prune` takes those tensors. Banks store prepared tensors, not raw
statistics, which is what keeps a lazily built bank's calibration state small.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from efficientllava.errors import ConfigError
from efficientllava.pruning.calibrate import LayerStats
from efficientllava.pruning.masks import level_index
from efficientllava.pruning.patterns import Pattern, check_nm_fits, check_sparsity

STATS = ("none", "norms", "hessian")  # what a method needs from calibration
SCOPES = ("matrix", "row")  # unstructured sparsity is exact per weight matrix, or per output row
Calibration = Mapping[str, Tensor]  # a method's prepared statistics for one input stream


@dataclass(frozen=True)
class MethodOptions:
    """Options of a method (none here). Subclasses validate in `__post_init__`; messages start with the field name."""

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain dict (YAML- and JSON-ready)."""
        return dataclasses.asdict(self)


class PruningMethod(ABC):
    """A pruning criterion: prunes one weight matrix [out, in] to an exact sparsity, optionally N:M."""

    name: ClassVar[str]
    stats: ClassVar[str] = "none"  # "none" | "norms" (sum of x_j^2 per input) | "hessian" (2/n X^T X)
    nested: ClassVar[bool] = False  # True: the pruned set at a level contains the pruned set at every lower level
    scope: ClassVar[str] = "matrix"  # unstructured: floor(s * numel) zeros per matrix, or floor(s * in) per row
    options_type: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, options: MethodOptions | None = None) -> None:
        if options is None:
            options = self.options_type()
        if type(options) is not self.options_type:
            raise ConfigError(f"pruning method {self.name!r} takes {self.options_type.__name__}, "
                              f"got {type(options).__name__}")
        self.options = options

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.as_dict().items())
        return f"{type(self).__name__}({opts})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options == self.options  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.options))

    def describe(self) -> dict[str, Any]:
        """Name and options as a plain dict (what manifests and fingerprints record)."""
        return {"name": self.name, **self.options.as_dict()}

    def prepare(self, stats: LayerStats | None) -> dict[str, Tensor]:
        """The tensors `prune` needs for the linears fed one input stream (computed once per stream).

        The default passes through what `stats` declares: nothing, the input column norms, or the Hessian.
        """
        if self.stats == "none":
            return {}
        if stats is None:
            raise ValueError(f"pruning method {self.name!r} needs calibration statistics (LayerStats), got None")
        if self.stats == "norms":
            return {"col_sq_norm": stats.col_sq_norm}
        if stats.hessian is None:
            raise ValueError(f"{self.name} needs a Hessian: collect stats with need_hessian=True")
        return {"hessian": stats.hessian}

    @abstractmethod
    def prune(self, weight: Tensor, calib: Calibration, sparsity: float, pattern: Pattern) -> Tensor:
        """Pruned copy of `weight` [out, in] in its dtype and on its device.

        Called (through `prune_weight`) only with 0 < sparsity < 1 that fits `pattern`, and an N:M
        pattern whose m divides in_features. Must not modify `weight` or `calib`.
        """


class NestedMethod(PruningMethod):
    """A method whose masks nest across levels: it ranks weights once by a saliency, lowest pruned first.

    Its variants of one matrix at every level are therefore one level index per weight (see
    `masks.level_index`), which is what the nested-mask bank stores.
    """

    nested: ClassVar[bool] = True

    @abstractmethod
    def saliency(self, weight: Tensor, calib: Calibration) -> Tensor:
        """Importance of each weight [out, in] (float32, same device); the lowest are pruned first."""

    def level_index(self, weight: Tensor, calib: Calibration, levels: Sequence[float], pattern: Pattern) -> Tensor:
        """uint8 [out, in]: for ascending `levels` (> 0), how many of them keep each weight."""
        return level_index(self.saliency(weight.detach(), calib), levels, pattern, self.scope == "row")

    def prune(self, weight: Tensor, calib: Calibration, sparsity: float, pattern: Pattern) -> Tensor:
        """`weight` with the lowest-saliency weights zeroed (the mask the bank's level index gives)."""
        keep = self.level_index(weight, calib, (sparsity,), pattern) >= 1
        return torch.where(keep, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))


# -- registry -------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[PruningMethod]] = {}
M = TypeVar("M", bound=type[PruningMethod])


def register_method(cls: M) -> M:
    """Class decorator: make a `PruningMethod` subclass available by its `name` (one name, one class)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be an identifier-like string, got {name!r}")
    if cls.stats not in STATS or cls.scope not in SCOPES:
        raise ValueError(f"{cls.__name__}: stats must be one of {STATS} and scope one of {SCOPES}")
    if not (dataclasses.is_dataclass(cls.options_type) and issubclass(cls.options_type, MethodOptions)):
        raise ValueError(f"{cls.__name__}.options_type must be a MethodOptions dataclass")
    known = _REGISTRY.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"pruning method {name!r} is already registered by {known.__module__}.{known.__qualname__}")
    _REGISTRY[name] = cls  # the same class again (a re-imported module) replaces itself
    return cls


def method_names() -> tuple[str, ...]:
    """Names of the registered pruning methods, in registration order."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type[PruningMethod]:
    """The class of a registered name, or of a `module:Class` reference (imported, so it registers itself).

    A reference lets a method defined outside the package reach every Ray worker: the worker imports
    the module when it reads the space, so no other file needs to know the method.
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None and isinstance(name, str) and ":" in name:
        module, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"pruning method {name!r} cannot be imported ({exc})") from None
        if not (isinstance(obj, type) and issubclass(obj, PruningMethod)):
            raise ConfigError(f"pruning method {name!r} is not a PruningMethod subclass")
        cls = obj
    if cls is None:
        raise ConfigError(f"pruning method {name!r} is unknown: use one of {', '.join(method_names())}, "
                          "or a module:Class reference")
    return cls


def get_method(name: str, options: Mapping[str, Any] | MethodOptions | None = None,
               where: str = "method") -> PruningMethod:
    """The method `name` with `options` (a mapping validated here, or its options dataclass).

    Errors name the key as `<where>.<option>`, so a YAML user sees which line to fix.
    """
    cls = method_class(name)
    if options is None or isinstance(options, MethodOptions):
        return cls(options)
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where} options must be a mapping, got {type(options).__name__}")
    fields = [f.name for f in dataclasses.fields(cls.options_type)]
    for key in options:
        if key not in fields:
            allowed = ", ".join(fields) if fields else "none"
            raise ConfigError(f"{where} has unknown key {key!r} for method {name!r}; allowed: {allowed}")
    try:
        return cls(cls.options_type(**options))
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from None


def prune_weight(method: str | PruningMethod, weight: Tensor, stats: LayerStats | None, sparsity: float,
                 pattern: Pattern | str, **options: Any) -> Tensor:
    """Pruned copy of `weight` [out, in] by `method` at `sparsity`: calibrate-prepare-prune in one call."""
    if isinstance(method, str):
        method = get_method(method, options)
    elif options:
        raise TypeError("pass options only with a method name")
    return prune_prepared(method, weight, method.prepare(stats), sparsity, pattern)


def prune_prepared(method: PruningMethod, weight: Tensor, calib: Calibration, sparsity: float,
                   pattern: Pattern | str) -> Tensor:
    """Validate `sparsity` and `pattern` for `weight`, then prune it (an unchanged copy at sparsity 0)."""
    pattern = Pattern.parse(pattern)
    if check_sparsity(sparsity, pattern) == 0.0:
        return weight.detach().clone()
    check_nm_fits(pattern, weight.shape[1])
    out = method.prune(weight.detach(), calib, float(sparsity), pattern)
    if out.shape != weight.shape or out.dtype != weight.dtype or out.device != weight.device:
        raise RuntimeError(f"pruning method {method.name!r} returned {out.dtype} {tuple(out.shape)} on "
                           f"{out.device} for a {weight.dtype} {tuple(weight.shape)} weight on {weight.device}")
    return out
