"""Prunable units of a LLaVA language model: decoder layers, optionally split into attention and MLP."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from efficientllava.errors import ConfigError

ATTN_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GRANULARITIES = ("layer", "sublayer")


@dataclass(frozen=True)
class PrunableUnit:
    """One unit a policy gives a sparsity ratio: `layer.3`, or `layer.3.attn` / `layer.3.mlp`."""

    name: str
    layer: int
    part: str  # "all" | "attn" | "mlp"
    linears: tuple[str, ...]  # module names relative to the full model


def unit_names(num_layers: int, granularity: str) -> list[str]:
    """Unit names, in model order, for a decoder of `num_layers` layers."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if granularity == "layer":
        return [f"layer.{i}" for i in range(num_layers)]
    return [f"layer.{i}.{part}" for i in range(num_layers) for part in ("attn", "mlp")]


def decoder_prefix(model: nn.Module) -> str:
    """Module path of the language model's decoder layer list (transformers 5 and 4 layouts)."""
    names = dict(model.named_modules())
    for prefix in ("model.language_model.layers", "language_model.model.layers", "model.layers"):
        if prefix in names and isinstance(names[prefix], nn.ModuleList):
            return prefix
    raise ConfigError(f"{type(model).__name__} has no LLaMA-style decoder layer list to prune")


def num_decoder_layers(model: nn.Module) -> int:
    """Number of decoder layers of the language model."""
    layers = model.get_submodule(decoder_prefix(model))
    assert isinstance(layers, nn.ModuleList)
    return len(layers)


def prunable_units(model: nn.Module, granularity: str) -> list[PrunableUnit]:
    """All prunable units of `model` at `granularity`, each with the linear modules it covers."""
    prefix = decoder_prefix(model)
    units = []
    for name in unit_names(num_decoder_layers(model), granularity):
        parts = name.split(".")
        layer = int(parts[1])
        part = parts[2] if len(parts) == 3 else "all"
        rel = {"all": ATTN_LINEARS + MLP_LINEARS, "attn": ATTN_LINEARS, "mlp": MLP_LINEARS}[part]
        units.append(PrunableUnit(name, layer, part, tuple(f"{prefix}.{layer}.{r}" for r in rel)))
    return units


def linear_modules(model: nn.Module, unit: PrunableUnit) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules of one unit, keyed by their module name."""
    return {name: model.get_submodule(name) for name in unit.linears}  # type: ignore[misc]
