"""Prunable units of a language model and their names: the ONE place that parses, formats and orders them.

A policy gives each unit one sparsity ratio. Granularities:

- `layer`: `layer.<i>`, every prunable linear of decoder layer i;
- `sublayer`: `layer.<i>.attn` (q, k, v, o) and `layer.<i>.mlp` (gate, up, down);
- `matrix`: `layer.<i>.q|k|v|o|gate|up|down`, one ratio per weight matrix (the paper's granularity).

Where the linears live is the model family's business (`families.ModelFamily.layer_linears`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from efficientllava.errors import ConfigError
from efficientllava.families import ROLES, family_of

GRANULARITIES = ("layer", "sublayer", "matrix")
# The parts of a decoder layer at each granularity, in model order, and the roles each part covers.
PARTS = {"layer": ("all",), "sublayer": ("attn", "mlp"), "matrix": ROLES}
PART_ROLES: dict[str, tuple[str, ...]] = {
    "all": ROLES, "attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"), **{r: (r,) for r in ROLES},
}
_PART_GRANULARITY = {part: g for g, parts in PARTS.items() for part in parts}
# Model order inside a layer: attention before MLP, q..o before gate..down, at every granularity.
_PART_RANK = {"all": 0, "attn": 1, **{r: 2 + i for i, r in enumerate(ROLES[:4])}, "mlp": 6,
              **{r: 7 + i for i, r in enumerate(ROLES[4:])}}
_UNIT = re.compile(r"^layer\.(\d+)(?:\.([a-z]+))?$")


@dataclass(frozen=True)
class PrunableUnit:
    """One unit a policy gives a sparsity ratio: `layer.3`, `layer.3.attn` or `layer.3.q`."""

    name: str
    layer: int
    part: str  # "all" | "attn" | "mlp" | a role ("q", ..., "down")
    linears: tuple[str, ...]  # module names relative to the full model


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")


def unit_name(layer: int, part: str) -> str:
    """The name of decoder layer `layer`'s unit `part` ("all" for the whole layer)."""
    return f"layer.{layer}" if part == "all" else f"layer.{layer}.{part}"


def parse_unit(name: str) -> tuple[int, str]:
    """`(layer, part)` of a unit name (part "all" for `layer.<i>`); ConfigError for anything else."""
    match = _UNIT.match(name) if isinstance(name, str) else None
    if match is None or (match.group(2) is not None and match.group(2) not in _PART_GRANULARITY):
        raise ConfigError(f"{name!r} is not a unit name; units are layer.<i>, layer.<i>.attn|mlp or "
                          f"layer.<i>.{'|'.join(ROLES)}")
    return int(match.group(1)), match.group(2) or "all"


def is_unit(name: str) -> bool:
    """Whether `name` is a well-formed unit name (of any granularity)."""
    try:
        parse_unit(name)
    except ConfigError:
        return False
    return True


def unit_granularity(name: str) -> str:
    """The granularity a unit name belongs to."""
    return _PART_GRANULARITY[parse_unit(name)[1]]


def granularity_of(names: Iterable[str]) -> str:
    """The one granularity all of `names` belong to; ConfigError when they mix granularities or are empty."""
    found = {unit_granularity(n) for n in names}
    if len(found) != 1:
        raise ConfigError(f"units must all be of one granularity ({', '.join(GRANULARITIES)}); got "
                          f"{', '.join(sorted(found)) or 'none'}")
    return found.pop()


def unit_sort_key(name: str) -> tuple[int, int, int, str]:
    """Model order: by layer number, attention before MLP, q/k/v/o/gate/up/down; non-unit names last, by name."""
    if not is_unit(name):
        return (1, 0, 0, name)
    layer, part = parse_unit(name)
    return (0, layer, _PART_RANK[part], "")


def sort_units(names: Iterable[str]) -> list[str]:
    """`names` in model order (see `unit_sort_key`)."""
    return sorted(names, key=unit_sort_key)


def unit_names(num_layers: int, granularity: str) -> list[str]:
    """Unit names, in model order, for a decoder of `num_layers` layers."""
    _check_granularity(granularity)
    return [unit_name(i, part) for i in range(num_layers) for part in PARTS[granularity]]


def num_decoder_layers(model: nn.Module) -> int:
    """Number of decoder layers of the language model."""
    return len(family_of(model).decoder_layers(model))


def prunable_units(model: nn.Module, granularity: str) -> list[PrunableUnit]:
    """All prunable units of `model` at `granularity`, each with the linear modules it covers."""
    family = family_of(model)
    units = []
    for name in unit_names(num_decoder_layers(model), granularity):
        layer, part = parse_unit(name)
        linears = family.layer_linears(layer)
        units.append(PrunableUnit(name, layer, part, tuple(linears[r] for r in PART_ROLES[part])))
    return units


def linear_modules(model: nn.Module, unit: PrunableUnit) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules of one unit, keyed by their module name."""
    return {name: model.get_submodule(name) for name in unit.linears}  # type: ignore[misc]
