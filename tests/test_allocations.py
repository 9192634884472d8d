"""Known allocations at a budget: uniform, OWL, depth slopes, attention/MLP splits, seed points."""

from __future__ import annotations

import pytest
import torch

from efficientllava.allocations import (
    attn_mlp_split,
    depth_slope,
    error_dp,
    owl,
    owl_outlier_ratios,
    room,
    seed_policies,
    uniform,
)
from efficientllava.errors import ConfigError
from efficientllava.pruning.units import PrunableUnit, prunable_units
from efficientllava.space import Budget, SearchSpace

LEVELS = tuple(round(0.7 + 0.02 * i, 2) for i in range(15))
SPACE = SearchSpace("sublayer", LEVELS, Budget(0.92, tolerance=0.001))
UNITS = [PrunableUnit(f"layer.{i}.{p}", i, p, ()) for i in range(6) for p in ("attn", "mlp")]
WEIGHTS = {u.name: 65536 if u.part == "attn" else 98304 for u in UNITS}
LAYER_UNITS = [PrunableUnit(f"layer.{i}", i, "all", ()) for i in range(6)]
LAYER_SPACE = SearchSpace("layer", LEVELS, Budget(0.92, tolerance=0.001))
LAYER_WEIGHTS = {u.name: 163840 for u in LAYER_UNITS}


def _in_band(policy, space=SPACE, weights=WEIGHTS) -> bool:
    return space.budget.in_band(policy.mean_sparsity(weights)) and all(
        r in space.levels_for(u) for u, r in policy.ratios)


def test_uniform_is_every_unit_at_the_target() -> None:
    assert set(uniform(SPACE, UNITS, WEIGHTS).as_dict().values()) == {0.92}


@pytest.mark.parametrize("spread", [-0.12, -0.06, 0.06, 0.12])
def test_depth_slopes_are_monotone_in_depth_and_at_the_budget(spread: float) -> None:
    policy = depth_slope(SPACE, UNITS, WEIGHTS, spread)
    assert _in_band(policy)
    mlp = [policy.ratio(f"layer.{i}.mlp") for i in range(6)]
    assert mlp == sorted(mlp, reverse=spread < 0) and mlp[0] != mlp[-1]


@pytest.mark.parametrize("diff", [-0.12, 0.06, 0.1])
def test_attn_mlp_splits(diff: float) -> None:
    policy = attn_mlp_split(SPACE, UNITS, WEIGHTS, diff)
    assert _in_band(policy)
    for i in range(6):
        a, m = policy.ratio(f"layer.{i}.attn"), policy.ratio(f"layer.{i}.mlp")
        assert (m > a) if diff > 0 else (m < a)
    with pytest.raises(ConfigError, match="sublayer or matrix"):
        attn_mlp_split(LAYER_SPACE, LAYER_UNITS, LAYER_WEIGHTS, 0.1)


def test_attn_mlp_split_at_matrix_granularity_groups_matrix_types() -> None:
    parts = ("q", "k", "v", "o", "gate", "up", "down")
    units = [f"layer.{i}.{p}" for i in range(2) for p in parts]  # names work as well as unit objects
    weights = {u: 16384 if u.split(".")[-1] in "qkvo" else 32768 for u in units}
    space = SearchSpace("matrix", LEVELS, Budget(0.92, tolerance=0.001))
    policy = attn_mlp_split(space, units, weights, 0.1)
    assert space.budget.in_band(policy.mean_sparsity(weights))
    assert {policy.ratio(f"layer.0.{p}") for p in "qkvo"} == {0.86}
    assert {policy.ratio(f"layer.0.{p}") for p in ("gate", "up", "down")} == {0.96}


def test_owl_prunes_outlier_rich_layers_less() -> None:
    outliers = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 3.0}
    policy = owl(LAYER_SPACE, LAYER_UNITS, LAYER_WEIGHTS, outliers)
    assert _in_band(policy, LAYER_SPACE, LAYER_WEIGHTS)
    assert policy.ratio("layer.5") < policy.ratio("layer.0")
    # OWL's rule before projection: layer 5 at target - (2 lam - mean), others at target + mean.
    assert policy.ratio("layer.5") == pytest.approx(0.92 - (0.16 - 0.16 / 6), abs=0.011)


def test_owl_outlier_ratios_from_the_model(small_model, small_batches) -> None:
    model, _ = small_model
    units = prunable_units(model, "sublayer")
    ratios = owl_outlier_ratios(model, small_batches, units)
    assert sorted(ratios) == sorted({u.layer for u in units})
    assert all(0.0 <= r <= 100.0 for r in ratios.values())
    # Layer 0 by hand: OWL's score |W| * ||X_j|| over all the layer's linears, share above 5 x its mean.
    from efficientllava.pruning.calibrate import collect_stats

    names = [n for u in units if u.layer == 0 for n in u.linears]
    stats = collect_stats(model, small_batches, names, need_hessian=False)
    scores = torch.cat([(model.get_submodule(n).weight.abs() * stats[n].col_sq_norm.sqrt()).flatten() for n in names])
    assert ratios[0] == pytest.approx(100.0 * float((scores > 5.0 * scores.mean()).float().mean()))


def test_seed_policies_are_named_unique_and_at_the_budget() -> None:
    outliers = {i: float(i) for i in range(6)}
    seeds = seed_policies(SPACE, UNITS, WEIGHTS, outliers)
    names = [n for n, _ in seeds]
    assert names[:2] == ["uniform", "owl"] and len(set(names)) == len(names)
    assert len({p.key for _, p in seeds}) == len(seeds)
    assert any(n.startswith("slope") for n in names) and any(n.startswith("split") for n in names)
    assert all(_in_band(p) for _, p in seeds)
    assert seed_policies(SPACE, [u.name for u in UNITS], WEIGHTS, outliers) == seeds
    layer_seeds = seed_policies(LAYER_SPACE, LAYER_UNITS, LAYER_WEIGHTS)
    assert not any(n.startswith(("split", "owl")) for n, _ in layer_seeds)
    assert room(SPACE, UNITS) == pytest.approx(0.06)


def test_error_dp_is_the_second_seed_when_errors_are_given() -> None:
    errors = {u.name: {lv: (3.0 if u.part == "mlp" else 1.0) * (1 + u.layer) * lv ** 8 for lv in LEVELS} for u in UNITS}
    seeds = seed_policies(SPACE, UNITS, WEIGHTS, {i: float(i) for i in range(6)}, errors=errors)
    assert [n for n, _ in seeds][:3] == ["uniform", "error-dp", "owl"]
    assert seeds[1][1] == error_dp(SPACE, UNITS, WEIGHTS, errors) and _in_band(seeds[1][1])
    # costlier units (MLP, deeper layers) are pruned less
    assert seeds[1][1].ratio("layer.0.attn") > seeds[1][1].ratio("layer.5.mlp")
