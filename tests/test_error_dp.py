"""Error DP: reconstruction errors of bank variants, and the least-error allocation at the budget."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from efficientllava.allocations import error_dp
from efficientllava.errors import PolicyError
from efficientllava.prompting import model_inputs
from efficientllava.pruning.bank import BankSpec, build_bank
from efficientllava.pruning.reconstruction import reconstruction_errors
from efficientllava.pruning.units import PrunableUnit, prunable_units
from efficientllava.space import Budget, SearchSpace

LEVELS = tuple(round(0.7 + 0.02 * i, 2) for i in range(15))


def _problem(n: int, seed: int, levels=LEVELS, tolerance: float = 0.001):
    rng = random.Random(seed)
    units = [PrunableUnit(f"layer.{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}", i // 2, "attn" if i % 2 == 0 else "mlp",
                          ()) for i in range(n)]
    weights = {u.name: rng.choice((16384, 32768, 49152)) for u in units}
    # convex-ish, unit-specific error curves (as SparseGPT's are): scale * exp(rate * level)
    errors = {u.name: {lv: rng.uniform(0.1, 5.0) * math.exp(rng.uniform(2, 12) * lv) for lv in levels} for u in units}
    space = SearchSpace("sublayer", levels, Budget(0.9, tolerance=tolerance))
    return space, units, weights, errors


def _cost(policy, errors) -> float:
    return math.fsum(errors[u][r] for u, r in policy.ratios)


@pytest.mark.parametrize("seed", range(4))
def test_error_dp_is_the_least_error_policy_in_the_band(seed: int) -> None:
    levels = (0.8, 0.85, 0.9, 0.95)
    space, units, weights, errors = _problem(5, seed, levels, tolerance=0.01)
    policy = error_dp(space, units, weights, errors)
    assert space.budget.in_band(policy.mean_sparsity(weights))
    total = sum(weights.values())
    inner = (space.budget.floor + space.budget.tolerance / 2, space.budget.ceiling - space.budget.tolerance / 2)
    best = math.inf
    for combo in itertools.product(levels, repeat=len(units)):  # exhaustive: every policy inside the band's middle
        mean = sum(weights[u.name] * lv for u, lv in zip(units, combo, strict=True)) / total
        if inner[0] <= mean <= inner[1]:
            best = min(best, math.fsum(errors[u.name][lv] for u, lv in zip(units, combo, strict=True)))
    assert _cost(policy, errors) <= best + 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_error_dp_lands_in_the_band_and_is_deterministic(seed: int) -> None:
    space, units, weights, errors = _problem(42, seed)
    policy = error_dp(space, units, weights, errors)
    assert space.budget.in_band(policy.mean_sparsity(weights))
    assert all(r in LEVELS for _, r in policy.ratios)
    assert error_dp(space, units, weights, errors) == policy


def test_a_unit_that_costs_nothing_takes_the_top_level() -> None:
    space, units, weights, errors = _problem(12, 0)
    errors[units[3].name] = {lv: 0.0 for lv in LEVELS}
    assert error_dp(space, units, weights, errors).ratio(units[3].name) == max(LEVELS)


def test_missing_errors_and_unreachable_bands_are_one_line_errors() -> None:
    space, units, weights, errors = _problem(4, 0)
    del errors[units[1].name][0.8]
    with pytest.raises(PolicyError, match=r"no reconstruction error for unit 'layer.0.mlp' at level 0.8"):
        error_dp(space, units, weights, errors)
    high = SearchSpace("sublayer", (0.1, 0.2), Budget(0.9, tolerance=0.001))
    with pytest.raises(PolicyError, match="no levels reach the budget band"):
        error_dp(high, units, weights, {u.name: {0.1: 1.0, 0.2: 2.0} for u in units})


def test_reconstruction_errors_are_the_output_error_of_each_variant(small_model, small_batches, tmp_path) -> None:
    model, _ = small_model
    units = prunable_units(model, "matrix")
    levels = (0.0, 0.5, 0.9)
    bank = build_bank(model, small_batches, BankSpec("matrix", tuple((u.name, levels) for u in units), "sparsegpt",
                                                     "unstructured"), tmp_path / "bank")
    errors = reconstruction_errors(model, small_batches, bank, units)
    assert set(errors) == {u.name for u in units}
    for u in units:
        assert errors[u.name][0.0] == 0.0
        assert 0.0 < errors[u.name][0.5] < errors[u.name][0.9]
    # independently: ||(W - W_hat) X||^2 * 2 / n_tokens over the unpadded token rows of the linear's input
    unit = next(u for u in units if u.part == "down")
    name = unit.linears[0]
    linear = model.get_submodule(name)
    rows = []

    def grab(module, args):
        rows.append(args[0].detach())

    handle = linear.register_forward_pre_hook(grab)
    x = []
    try:
        with torch.no_grad():
            for batch in small_batches:
                rows.clear()
                model(**model_inputs(batch))
                x.append(rows[0][batch["attention_mask"] == 1])
    finally:
        handle.remove()
    x = torch.cat(x).float()
    dense = {name: linear.weight.detach()}
    dw = bank.variant(unit.name, 0.9, dense)[name].float() - linear.weight.detach().float()
    direct = float(((x @ dw.T) ** 2).sum()) * 2 / x.shape[0]
    assert errors[unit.name][0.9] == pytest.approx(direct, rel=1e-3)
