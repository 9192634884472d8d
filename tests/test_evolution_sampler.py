"""The budget-preserving evolutionary sampler: never leaves the band, elitist, deterministic, concurrent."""

from __future__ import annotations

import threading

import optuna
import pytest

from efficientllava.errors import ConfigError
from efficientllava.search.api import Param, Space, SpaceBudget
from efficientllava.search.samplers.evolution import BudgetEvolutionSampler, make_evolution

LEVELS = tuple(round(0.7 + 0.02 * i, 2) for i in range(15))
PARAMS = tuple(Param(f"u{i}", 0, 14, LEVELS, 1.0 if i % 2 == 0 else 1.5) for i in range(12))
SPACE = Space(PARAMS, SpaceBudget(0.92, 0.001))


def _mean(params: dict[str, int], space: Space = SPACE) -> float:
    total = sum(p.weight for p in space.params)
    return sum(p.weight * p.levels[params[p.name] - p.low] for p in space.params) / total  # type: ignore[index]


def _objective(trial: optuna.Trial) -> float:
    idx = {p.name: trial.suggest_int(p.name, p.low, p.high) for p in PARAMS}
    # Best: u0 low (protected), u11 high; every other unit indifferent.
    return -float((idx["u0"] - 3) ** 2 + (idx["u11"] - 14) ** 2)


def _study(seed: int = 0, space: Space = SPACE) -> optuna.Study:
    return optuna.create_study(direction="maximize", sampler=BudgetEvolutionSampler(space, seed))


def _in_band(params: dict[str, int], space: Space = SPACE) -> bool:
    assert space.budget is not None
    lo, hi = space.budget.target - space.budget.tolerance, space.budget.target + space.budget.tolerance
    return lo - 1e-9 <= _mean(params, space) <= hi + 1e-9


def test_never_leaves_the_budget_and_improves() -> None:
    study = _study()
    study.optimize(_objective, n_trials=120)
    assert all(_in_band(t.params) for t in study.trials)
    first = study.trials[0].value
    assert first is not None and study.best_value > first
    assert study.best_params["u0"] < study.trials[0].params["u0"]


def test_deterministic_given_seed() -> None:
    runs = []
    for _ in range(2):
        study = _study(seed=7)
        study.optimize(_objective, n_trials=30)
        runs.append([t.params for t in study.trials])
    assert runs[0] == runs[1]
    other = _study(seed=8)
    other.optimize(_objective, n_trials=30)
    assert [t.params for t in other.trials] != runs[0]


def test_offspring_of_the_best_and_enqueued_points_run_as_given() -> None:
    study = _study()
    good = {p.name: 11 for p in PARAMS}  # uniform 0.92: in the band
    study.enqueue_trial(good)
    study.optimize(_objective, n_trials=1)
    assert study.trials[0].params == good
    study.optimize(_objective, n_trials=1)
    child = study.trials[1].params
    changed = [n for n in good if child[n] != good[n]]
    assert 2 <= len(changed) <= 8 and _in_band(child)  # a few swaps from the only (best) parent
    assert child != good


def test_concurrent_trials_stay_in_band_and_differ() -> None:
    study = _study(seed=3)
    lock = threading.Lock()
    seen: list[tuple[int, ...]] = []

    def objective(trial: optuna.Trial) -> float:
        value = _objective(trial)
        with lock:
            seen.append(tuple(trial.params[p.name] for p in PARAMS))
        return value

    study.optimize(objective, n_trials=40, n_jobs=2)
    assert len(study.trials) == 40
    assert all(_in_band(t.params) for t in study.trials)
    assert len(set(seen)) == len(seen)  # no two trials sampled alike


def test_unequal_weights_and_own_level_lists() -> None:
    params = (Param("a", 0, 2, (0.0, 0.5, 0.9), 3.0), Param("b", 0, 4, (0.1, 0.3, 0.5, 0.7, 0.9), 1.0),
              Param("c", 1, 3, (0.2, 0.5, 0.8), 2.0))
    space = Space(params, SpaceBudget(0.5, 0.1))
    study = optuna.create_study(direction="minimize", sampler=BudgetEvolutionSampler(space, 0))
    study.optimize(lambda t: float(sum(t.suggest_int(p.name, p.low, p.high) for p in params)), n_trials=40)
    assert all(_in_band(t.params, space) for t in study.trials)


def test_no_budget_means_swaps_only_and_factory() -> None:
    space = Space(PARAMS, None)
    sampler = make_evolution(None, 0, space)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(_objective, n_trials=10)
    assert len(study.trials) == 10


@pytest.mark.parametrize("kwargs, match", [({"max_swaps": 0}, "max_swaps"), ({"parents": 0}, "parents"),
                                           ({"max_step": 0}, "max_step"), ({"group_moves": 1.5}, "group_moves")])
def test_bad_options_are_one_line_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        BudgetEvolutionSampler(SPACE, 0, **kwargs)
    assert "\n" not in str(err.value)


def test_unreachable_band_is_a_config_error() -> None:
    space = Space(PARAMS, SpaceBudget(0.99, 0.001))
    with pytest.raises(ConfigError, match="evolution"):
        BudgetEvolutionSampler(space, 0)


def test_unit_groups_and_group_moves_stay_in_band() -> None:
    from efficientllava.pruning.units import unit_names
    from efficientllava.search.samplers.evolution import unit_groups

    names = unit_names(2, "matrix")
    groups = [[names[i] for i in g] for g in unit_groups(names)]
    assert ["layer.0.q", "layer.0.k", "layer.0.v", "layer.0.o"] in groups  # a layer's attention matrices
    assert ["layer.0.q", "layer.1.q"] in groups  # one matrix type across layers
    assert names[:7] in groups  # a whole layer
    assert unit_groups(["u0", "u1"]) == []  # not unit names: single-parameter swaps only
    weights = {n: 1.0 if n.split(".")[-1] in "qkvo" else 2.0 for n in names}
    space = Space(tuple(Param(n, 0, 14, LEVELS, weights[n]) for n in names), SpaceBudget(0.92, 0.001))
    study = optuna.create_study(direction="maximize",
                                sampler=BudgetEvolutionSampler(space, 0, group_moves=1.0))
    study.optimize(lambda t: -float(sum(t.suggest_int(n, 0, 14) * (i % 3) for i, n in enumerate(names))),
                   n_trials=40)
    assert all(_in_band(t.params, space) for t in study.trials)
    assert study.best_value > study.trials[0].value  # type: ignore[operator]


def test_matrix_units_move_by_whole_blocks_first_then_alone() -> None:
    """Coarse to fine: the first 2 x units trials move a layer's attention or MLP matrices together."""
    import random

    from efficientllava.pruning.units import unit_names
    from efficientllava.search.samplers.evolution import block_groups

    names = unit_names(3, "matrix")
    blocks = [[names[i] for i in g] for g in block_groups(names)]
    assert blocks[0] == ["layer.0.q", "layer.0.k", "layer.0.v", "layer.0.o"] and len(blocks) == 6
    assert block_groups(unit_names(3, "sublayer")) == []  # a block is one unit already: no coarse phase
    levels = tuple(round(0.5 + 0.02 * i, 2) for i in range(25))
    free = Space(tuple(Param(n, 0, 24, levels, 1.0) for n in names), None)  # no band: no projection
    sampler = BudgetEvolutionSampler(free, 0)
    assert sampler._coarse == 2 * len(names)
    assert BudgetEvolutionSampler(Space(PARAMS[:4], None), 0)._coarse == 0  # not matrix units
    parent = [12] * len(names)
    rng = random.Random(0)
    singles = 0
    for coarse in (True, False):
        for _ in range(50):
            child = sampler._mutate(parent, rng, coarse=coarse)
            moved = {names[i] for i, (a, b) in enumerate(zip(parent, child, strict=True)) if a != b}
            whole = all(set(b) <= moved or not set(b) & moved for b in blocks)
            if coarse:
                assert moved and whole, f"a coarse move split a block: {sorted(moved)}"
            singles += not whole
    assert singles > 0, "after the coarse phase single matrices move too"
    with pytest.raises(ConfigError, match="coarse"):
        BudgetEvolutionSampler(free, 0, coarse=-1)
