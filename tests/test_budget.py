"""Budget-exact scoring: projection of any policy into the band target +- tolerance."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.policy import PruningPolicy
from efficientllava.space import (
    Budget,
    SearchSpace,
    check_band,
    fit_to_budget,
    load_space,
    min_tolerance,
    policy_indices,
    project,
    project_indices,
    repair,
)

UNITS = [f"layer.{i}.{p}" for i in range(6) for p in ("attn", "mlp")]
WEIGHTS = {u: 65536 if u.endswith("attn") else 98304 for u in UNITS}  # the tiny model's sublayers
LEVELS = tuple(round(0.7 + 0.02 * i, 2) for i in range(15))
SPACE = SearchSpace("sublayer", LEVELS, Budget(0.92, tolerance=0.001))


def _random_policy(rng: random.Random, space: SearchSpace = SPACE) -> PruningPolicy:
    return PruningPolicy(tuple((u, rng.choice(space.levels_for(u))) for u in UNITS))


@pytest.mark.parametrize("seed", range(4))
def test_random_policies_land_in_band_deterministically_and_idempotently(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        policy = _random_policy(rng)
        fixed = project(policy, SPACE, WEIGHTS)
        assert SPACE.budget.in_band(fixed.mean_sparsity(WEIGHTS))
        assert all(r in SPACE.levels for _, r in fixed.ratios)
        assert project(policy, SPACE, WEIGHTS) == fixed  # deterministic
        assert project(fixed, SPACE, WEIGHTS) is fixed  # idempotent
        below = policy.mean_sparsity(WEIGHTS) < SPACE.budget.floor
        for (_, old), (_, new) in zip(policy.ratios, fixed.ratios, strict=True):
            assert new >= old if below else new <= old  # one direction only


def test_projection_goes_down_as_well_as_up() -> None:
    high = PruningPolicy.uniform(UNITS, 0.98)
    low = PruningPolicy.uniform(UNITS, 0.7)
    assert project(high, SPACE, WEIGHTS).mean_sparsity(WEIGHTS) == pytest.approx(0.92, abs=0.001)
    assert project(low, SPACE, WEIGHTS).mean_sparsity(WEIGHTS) == pytest.approx(0.92, abs=0.001)
    assert project(PruningPolicy.uniform(UNITS, 0.9), SPACE, WEIGHTS) == PruningPolicy.uniform(UNITS, 0.92)


def test_projection_spreads_change_and_keeps_the_samplers_shape() -> None:
    # Attention protected at 0.7, MLP at 0.9: mean 0.82. The projection raises both, keeping attn < mlp.
    policy = PruningPolicy(tuple((u, 0.7 if u.endswith("attn") else 0.9) for u in UNITS))
    fixed = project(policy, SPACE, WEIGHTS)
    for i in range(6):
        assert fixed.ratio(f"layer.{i}.attn") < fixed.ratio(f"layer.{i}.mlp")
        assert fixed.ratio(f"layer.{i}.attn") > 0.7


def test_off_grid_ratios_are_snapped_then_projected() -> None:
    policy = PruningPolicy.uniform(UNITS, 0.921)
    fixed = project(policy, SPACE, WEIGHTS)
    assert fixed == PruningPolicy.uniform(UNITS, 0.92)


def test_each_unit_keeps_its_own_levels() -> None:
    space = SPACE.with_unit_levels({"layer.0.attn": [0.7, 0.72]})
    fixed = project(PruningPolicy.uniform(UNITS, 0.98), space, WEIGHTS)
    assert fixed.ratio("layer.0.attn") in (0.7, 0.72)
    assert space.budget.in_band(fixed.mean_sparsity(WEIGHTS))


def test_unreachable_band_and_too_tight_tolerance_are_errors() -> None:
    tight = SearchSpace("sublayer", LEVELS, Budget(0.92, tolerance=0.0))
    with pytest.raises(ConfigError, match=r"set budget.tolerance >= 0.001") as err:
        check_band(tight, UNITS, WEIGHTS)
    assert "\n" not in str(err.value)
    assert min_tolerance(SPACE, UNITS, WEIGHTS) == pytest.approx(0.001)
    check_band(SPACE, UNITS, WEIGHTS)
    check_band(SearchSpace("sublayer", LEVELS, Budget(0.92, 0.0, over_budget="repair")), UNITS, WEIGHTS)
    out_of_reach = SearchSpace("sublayer", (0.1, 0.2), Budget(0.5, 0.01))
    with pytest.raises(PolicyError, match="out of reach"):
        project(PruningPolicy.uniform(UNITS, 0.1), out_of_reach, WEIGHTS)
    with pytest.raises(PolicyError, match="narrower than one level step"):
        project_indices([(0.0, 0.5), (0.0, 0.5)], [0, 0], [1.0, 1.0], 0.2, 0.21)


def test_fit_to_budget_follows_over_budget() -> None:
    policy = PruningPolicy.uniform(UNITS, 0.98)
    assert fit_to_budget(policy, SPACE, WEIGHTS).mean_sparsity(WEIGHTS) == pytest.approx(0.92, abs=0.001)
    for mode in ("repair", "penalize", "reject"):
        space = SearchSpace("sublayer", LEVELS, Budget(0.92, 0.001, over_budget=mode))
        assert fit_to_budget(policy, space, WEIGHTS) is policy  # above the floor: kept as sampled
    low = PruningPolicy.uniform(UNITS, 0.8)
    repair_space = SearchSpace("sublayer", LEVELS, Budget(0.92, 0.001, over_budget="repair"))
    assert fit_to_budget(low, repair_space, WEIGHTS) == repair(low, repair_space, WEIGHTS)


def test_budget_band_and_satisfied() -> None:
    budget = Budget(0.5, 0.01)
    assert budget.over_budget == "project"
    assert (budget.floor, budget.ceiling) == pytest.approx((0.49, 0.51))
    assert budget.satisfied(0.505) and not budget.satisfied(0.52)
    assert Budget(0.5, 0.01, over_budget="repair").satisfied(0.52)


def test_policy_indices_round_trip() -> None:
    policy = project(_random_policy(random.Random(9)), SPACE, WEIGHTS)
    idx = policy_indices(policy, SPACE)
    assert PruningPolicy(tuple((u, SPACE.levels_for(u)[idx[u]]) for u in UNITS)) == policy
    with pytest.raises(PolicyError, match="not one of its levels"):
        policy_indices(PruningPolicy.uniform(UNITS, 0.921), SPACE)


def test_shipped_tiny_space_band_is_reachable() -> None:
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml")
    units = space.unit_names(6)
    check_band(space, units, WEIGHTS)
    rng = random.Random(0)
    for _ in range(20):
        p = PruningPolicy(tuple((u, rng.choice(space.levels_for(u))) for u in units))
        assert space.budget.in_band(project(p, space, WEIGHTS).mean_sparsity(WEIGHTS))
