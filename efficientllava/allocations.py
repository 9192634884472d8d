"""Strong known allocations at a budget: uniform, OWL, depth slopes, attention/MLP splits, error DP.

Each is a rule that gives every prunable unit a sparsity ratio from a few numbers; each result is
projected onto the space's levels and its budget band (`space.project`), so it is a policy a
trial can score as is. They are what a search must beat, and what round 0 starts from
(`seed_policies`): a searched policy that one of them beats at the same budget is a defect of
the search.

- uniform: every unit at the target (SparseGPT's and Wanda's default).
- OWL (Yin et al., ICML 2024, "outlier-weighted layerwise sparsity"): per decoder layer, the
  outlier ratio D_l = share of the layer's weights whose |W_ij| * ||X_j||_2 exceeds M times the
  layer's mean of that score (M = 5); D is min-max normalised to [0, 2 lambda] and the layer's
  sparsity is target - (D_l - mean D), lambda = 0.08 (the paper's defaults), so outlier-rich
  layers are pruned less. OWL is layerwise: every unit of a layer gets the layer's ratio.
- depth slopes (ATP, Huang et al., ICML 2025): sparsity linear in depth,
  r_l = target + spread * (l / (L - 1) - 1/2); ATP finds rising slopes near optimal for LLMs;
  falling ones are included too (a vision-language model's first layers read the image tokens).
- attention/MLP splits: attention units at a, MLP units at a + diff, with a chosen so the
  weighted mean is the target (needs sublayer or matrix granularity).
- error DP (OBC, Frantar & Alistarh, NeurIPS 2022; SPDY's starting point): the levels that minimise
  the sum of the units' own reconstruction errors tr(dW H dW^T) (`pruning.reconstruction`) with the
  mean in the budget band, by dynamic programming over the budget; exact up to a budget grid of a
  quarter of the band per unit count, so it lands in the band by construction.

Units are unit names (`layer.3`, `layer.3.attn`, `layer.3.q`, ...) or anything with `name`,
`layer` and `part` (e.g. `pruning.units.PrunableUnit`); a unit is attention or MLP by the roles
its part covers (`pruning.units.PART_ROLES`), so the rules hold at every granularity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from efficientllava.budget_dp import least_cost_indices
from efficientllava.errors import ConfigError, PolicyError
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.units import PART_ROLES, PrunableUnit, parse_unit, prunable_units
from efficientllava.space import SearchSpace, policy_indices, project

ATTN_PARTS = frozenset(p for p, roles in PART_ROLES.items() if set(roles) <= set(PART_ROLES["attn"]))
MLP_PARTS = frozenset(p for p, roles in PART_ROLES.items() if set(roles) <= set(PART_ROLES["mlp"]))
OWL_M = 5.0  # outlier threshold: a score above M x the layer mean is an outlier (OWL's README setting)
OWL_LAMBDA = 0.08  # half the spread of OWL's layer sparsities (OWL's default)
_TOP = 0.999  # continuous ratios are clipped below 1 before projection onto the levels


class UnitLike(Protocol):
    """A prunable unit: its name, decoder layer and part ("all", "attn", "mlp", "q", ..., "down")."""

    @property
    def name(self) -> str: ...  # noqa: D102

    @property
    def layer(self) -> int: ...  # noqa: D102

    @property
    def part(self) -> str: ...  # noqa: D102


Units = Sequence[UnitLike] | Sequence[str]


def _units(units: Units) -> list[UnitLike]:
    """Unit objects for names (via `pruning.units.parse_unit`) or objects, in the given order."""
    out: list[UnitLike] = []
    for u in units:
        if isinstance(u, str):
            layer, part = parse_unit(u)
            out.append(PrunableUnit(u, layer, part, ()))
        else:
            out.append(u)
    return out


def _policy(ratios: Mapping[str, float], units: Sequence[UnitLike], space: SearchSpace,
            weights: Mapping[str, int]) -> PruningPolicy:
    """Continuous ratios -> the nearest policy on the levels within the budget band."""
    raw = PruningPolicy(tuple((u.name, min(max(ratios[u.name], 0.0), _TOP)) for u in units))
    return project(raw, space, weights)


def uniform(space: SearchSpace, units: Units, weights: Mapping[str, int]) -> PruningPolicy:
    """Every unit at the budget's target (projected onto the levels and the band)."""
    units = _units(units)
    return _policy({u.name: space.budget.target for u in units}, units, space, weights)


def depth_slope(space: SearchSpace, units: Units, weights: Mapping[str, int],
                spread: float) -> PruningPolicy:
    """Sparsity linear in depth: `spread` from the first to the last layer (> 0 rising), centred on the target."""
    units = _units(units)
    layers = sorted({u.layer for u in units})
    span = max(len(layers) - 1, 1)
    pos = {layer: i / span - 0.5 for i, layer in enumerate(layers)}
    return _policy({u.name: space.budget.target + spread * pos[u.layer] for u in units}, units, space, weights)


def attn_mlp_split(space: SearchSpace, units: Units, weights: Mapping[str, int],
                   diff: float) -> PruningPolicy:
    """Attention units at a, MLP units at a + `diff`, with a such that the weighted mean is the target."""
    units = _units(units)
    attn = [u for u in units if u.part in ATTN_PARTS]
    mlp = [u for u in units if u.part in MLP_PARTS]
    if not attn or not mlp or len(attn) + len(mlp) != len(units):
        raise ConfigError("an attention/MLP split needs sublayer or matrix granularity")
    total = sum(weights[u.name] for u in units)
    a = space.budget.target - diff * sum(weights[u.name] for u in mlp) / total
    return _policy({u.name: a + (diff if u.part in MLP_PARTS else 0.0) for u in units}, units, space, weights)


def owl(space: SearchSpace, units: Units, weights: Mapping[str, int], outliers: Mapping[int, float],
        lam: float = OWL_LAMBDA) -> PruningPolicy:
    """OWL: layer sparsity target - (D_l - mean D), D = outlier ratios min-max scaled to [0, 2 lam]."""
    units = _units(units)
    layers = sorted({u.layer for u in units})
    missing = [layer for layer in layers if layer not in outliers]
    if missing:
        raise PolicyError(f"no OWL outlier ratio for layer {missing[0]}")
    raw = [outliers[layer] for layer in layers]
    lo, hi = min(raw), max(raw)
    scaled = [(d - lo) / (hi - lo) * 2 * lam if hi > lo else 0.0 for d in raw]
    mean = math.fsum(scaled) / len(scaled)
    by_layer = {layer: space.budget.target - (s - mean) for layer, s in zip(layers, scaled, strict=True)}
    return _policy({u.name: by_layer[u.layer] for u in units}, units, space, weights)


@torch.no_grad()
def owl_outlier_ratios(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], units: Sequence[Any],
                       m: float = OWL_M) -> dict[int, float]:
    """OWL's per-layer outlier ratio (%) from the few-shot inputs: share of |W| * ||X||_2 above m x its mean.

    `units` must carry `linears` (full module names, as `pruning.units.prunable_units` gives); all
    linears of a layer are pooled, whatever the granularity.
    """
    from efficientllava.pruning.calibrate import collect_stats

    by_layer: dict[int, list[str]] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).extend(u.linears)
    out: dict[int, float] = {}
    batches = list(batches)
    for layer, names in sorted(by_layer.items()):
        stats = collect_stats(model, batches, names, need_hessian=False)
        scores = []
        for name in names:
            linear = model.get_submodule(name)
            assert isinstance(linear, torch.nn.Linear)
            weight = linear.weight.detach().float()
            scores.append((weight.abs() * stats[name].col_sq_norm.to(weight.device).sqrt()[None, :]).flatten())
        flat = torch.cat(scores)
        out[layer] = float((flat > m * flat.mean()).float().mean()) * 100.0
    return out


def error_dp(space: SearchSpace, units: Units, weights: Mapping[str, int],
             errors: Mapping[str, Mapping[float, float]]) -> PruningPolicy:
    """The levels with the least summed reconstruction error whose weighted mean lies in the budget band.

    `errors[unit][level]` as `pruning.reconstruction.reconstruction_errors` gives; the knapsack DP of
    `budget_dp.least_cost_indices` (in the band by construction; deterministic).
    """
    names = [u.name for u in _units(units)]
    levels = [tuple(space.levels_for(u)) for u in names]
    for u, lvs in zip(names, levels, strict=True):
        missing = [lv for lv in lvs if lv not in errors.get(u, {})]
        if missing:
            raise PolicyError(f"error DP: no reconstruction error for unit {u!r} at level {missing[0]:g}")
        if u not in weights:
            raise PolicyError(f"error DP: no parameter count for unit {u!r}")
    budget = space.budget
    costs = [[float(errors[u][lv]) for lv in lvs] for u, lvs in zip(names, levels, strict=True)]
    try:
        idx = least_cost_indices(levels, [float(weights[u]) for u in names], costs, budget.floor, budget.ceiling,
                                 names=names)
    except PolicyError as exc:
        raise PolicyError(f"error DP: {exc}") from None
    return PruningPolicy(tuple((u, lvs[k]) for u, lvs, k in zip(names, levels, idx, strict=True)))


def room(space: SearchSpace, units: Units) -> float:
    """How far every unit can move from the target within its levels: min(target - lowest, highest - target)."""
    target = space.budget.target
    return max(min(min(target - min(space.levels_for(u.name)), max(space.levels_for(u.name)) - target)
                   for u in _units(units)), 0.0)


def seed_policies(space: SearchSpace, units: Units, weights: Mapping[str, int],
                  outliers: Mapping[int, float] | None = None,
                  multiples: Sequence[float] = (-2.0, -1.0, 1.0, 2.0),
                  errors: Mapping[str, Mapping[float, float]] | None = None) -> list[tuple[str, PruningPolicy]]:
    """Named strong starting points at the budget, best-known first, duplicates dropped.

    uniform; error DP (when `errors`, from `pruning.reconstruction.reconstruction_errors`, are
    given); OWL (when `outliers`, from `owl_outlier_ratios`, are given); depth slopes and
    attention/MLP splits whose spread is each of `multiples` x `room(space, units)` (the distance
    every unit can move from the target within its levels). Round 0 enqueues these.
    """
    units = _units(units)
    out: list[tuple[str, PruningPolicy]] = [("uniform", uniform(space, units, weights))]
    if errors is not None:
        out.append(("error-dp", error_dp(space, units, weights, errors)))
    if outliers is not None:
        out.append(("owl", owl(space, units, weights, outliers)))
    r = room(space, units)
    if r > 0:
        for k in multiples:
            out.append((f"slope{k * r:+.3f}", depth_slope(space, units, weights, k * r)))
        if {u.part for u in units} - {"all"}:
            for k in multiples:
                out.append((f"split{k * r:+.3f}", attn_mlp_split(space, units, weights, k * r)))
    seen: set[str] = set()
    unique = []
    for name, policy in out:
        if policy.key not in seen:
            seen.add(policy.key)
            unique.append((name, policy))
    return unique


def seed_points(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], space: SearchSpace,
                weights: Mapping[str, int],
                errors: Mapping[str, Mapping[float, float]] | None = None) -> dict[str, dict[str, int]]:
    """Round 0's named seed points as level indices of `space` (run where the model and few-shot set are).

    The model's units at the space's granularity, OWL's outlier ratios from `batches`, the
    reconstruction errors of `space`'s levels (`pruning.reconstruction.reconstruction_errors`; None: no
    error DP), then `seed_policies`; each point is `{unit: index of its level}`, what a trial's params hold.
    """
    units = prunable_units(model, space.granularity)
    outliers = owl_outlier_ratios(model, batches, units)
    return {name: policy_indices(policy, space)
            for name, policy in seed_policies(space, units, weights, outliers, errors=errors)}
