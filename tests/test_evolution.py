"""Search-space evolution: windows around the top policies, margins, budget reachability, descriptions."""

from __future__ import annotations

import pytest

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.evolution import describe_evolution, evolve_space
from efficientllava.policy import PruningPolicy
from efficientllava.space import Budget, SearchSpace, dump_space, load_space, repair

LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
UNITS = ("layer.0", "layer.1", "layer.2")
WEIGHTS = {u: 100 for u in UNITS}


def space(target: float = 0.2, **kwargs) -> SearchSpace:
    return SearchSpace(
        granularity="layer", levels=LEVELS, budget=Budget(target=target, tolerance=0.0), **kwargs
    )


def pol(*ratios: float) -> PruningPolicy:
    return PruningPolicy(tuple(zip(UNITS, ratios, strict=True)))


TOP = [pol(0.2, 0.5, 0.0), pol(0.3, 0.5, 0.1), pol(0.2, 0.6, 0.0)]


def test_margin_one_narrows_around_the_top_policies() -> None:
    new = evolve_space(space(), TOP, 1, WEIGHTS)
    assert new.levels_for("layer.0") == (0.1, 0.2, 0.3, 0.4)
    assert new.levels_for("layer.1") == (0.4, 0.5, 0.6, 0.7)
    assert new.levels_for("layer.2") == (0.0, 0.1, 0.2)  # 0 kept: inside the window, clipped at the bottom
    assert new.levels == LEVELS and new.budget == space().budget  # everything else unchanged
    for policy in TOP:  # every top policy stays in the new space
        assert all(r in new.levels_for(u) for u, r in policy.ratios)


def test_margin_zero_keeps_only_chosen_range() -> None:
    new = evolve_space(space(), TOP, 0, WEIGHTS)
    assert new.levels_for("layer.0") == (0.2, 0.3)
    assert new.levels_for("layer.1") == (0.5, 0.6)
    assert new.levels_for("layer.2") == (0.0, 0.1)
    one = evolve_space(space(), TOP[:1], 0, WEIGHTS)
    assert [one.levels_for(u) for u in UNITS] == [(0.2,), (0.5,), (0.0,)]  # one policy: a fixed point


def test_level_zero_dropped_outside_window_and_top_clipped() -> None:
    new = evolve_space(space(), [pol(0.8, 0.7, 0.4)], 2, WEIGHTS)
    assert new.levels_for("layer.0") == (0.6, 0.7, 0.8)
    assert new.levels_for("layer.1") == (0.5, 0.6, 0.7, 0.8)
    assert 0.0 not in new.levels_for("layer.2") and new.levels_for("layer.2") == (0.2, 0.3, 0.4, 0.5, 0.6)


def test_upper_ends_widen_until_budget_is_reachable() -> None:
    # Top policies meet the 0.5 budget only after repair; margin 0 would cap the space at mean 0.3.
    budget_space = space(target=0.5)
    top = [pol(0.3, 0.3, 0.3)]
    new = evolve_space(budget_space, top, 0, WEIGHTS)
    assert [new.levels_for(u) for u in UNITS] == [(0.3, 0.4, 0.5)] * 3  # widened by 2 uniform steps, no more
    assert repair(top[0], new, WEIGHTS).mean_sparsity(WEIGHTS) >= 0.5 - 1e-9
    # Uneven weights: the widening is uniform in steps, and clipped per unit at its old top level.
    weights = {"layer.0": 10, "layer.1": 10, "layer.2": 80}
    new = evolve_space(budget_space, [pol(0.8, 0.8, 0.1)], 0, weights)
    assert new.levels_for("layer.0") == (0.8,) and new.levels_for("layer.1") == (0.8,)
    assert new.levels_for("layer.2") == (
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
    )  # 0.16 + 0.8 * 0.5 >= 0.5 > 0.16 + 0.8 * 0.4
    top_policy = PruningPolicy(tuple((u, new.levels_for(u)[-1]) for u in UNITS))
    assert top_policy.mean_sparsity(weights) >= 0.5 - 1e-9


def test_unreachable_budget_and_bad_inputs() -> None:
    tight = SearchSpace(granularity="layer", levels=(0.0, 0.1, 0.2), budget=Budget(target=0.5, tolerance=0.0))
    with pytest.raises(PolicyError, match="cannot meet its budget"):
        evolve_space(tight, [pol(0.1, 0.1, 0.1)], 1, WEIGHTS)
    with pytest.raises(PolicyError, match=r"layer\.1 ratio 0\.55"):
        evolve_space(space(), [pol(0.1, 0.55, 0.1)], 1, WEIGHTS)
    with pytest.raises(ConfigError, match="margin"):
        evolve_space(space(), TOP, -1, WEIGHTS)
    with pytest.raises(ConfigError, match="at least one top policy"):
        evolve_space(space(), [], 1, WEIGHTS)
    with pytest.raises(PolicyError, match="no parameter count"):
        evolve_space(space(), TOP, 1, {"layer.0": 1})


def test_evolving_twice_and_round_trip(tmp_path) -> None:
    first = evolve_space(space(), TOP, 1, WEIGHTS)
    second = evolve_space(first, [pol(0.1, 0.4, 0.2)], 0, WEIGHTS)  # indices refer to the narrowed lists
    assert [second.levels_for(u) for u in UNITS] == [(0.1,), (0.4,), (0.2,)]
    assert load_space(dump_space(first, tmp_path / "evolved.yaml")) == first
    with pytest.raises(PolicyError, match="not one of its levels"):
        evolve_space(first, [pol(0.8, 0.5, 0.0)], 0, WEIGHTS)  # 0.8 was evolved out of layer.0


def test_describe_evolution_lists_changed_units_only() -> None:
    old = space(unit_levels=(("layer.1", (0.4, 0.5, 0.6, 0.7)),))
    new = evolve_space(old, [pol(0.2, 0.5, 0.0), pol(0.2, 0.6, 0.0)], 1, WEIGHTS)
    assert describe_evolution(old, new).splitlines() == [
        "layer.0: [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] -> [0.1, 0.2, 0.3]",
        "layer.2: [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] -> [0, 0.1]",
    ]  # layer.1's window [0.4 .. 0.7] equals its old levels
    assert describe_evolution(new, new) == ""
