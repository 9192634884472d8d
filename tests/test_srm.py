"""Tests of the SRM generalisation-gap penalty."""

from __future__ import annotations

import math

import pytest

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.policy import PruningPolicy
from efficientllava.scoring.srm import SRMConfig, capacity, generalization_gap, log_norm_ratios, srm_penalty

UNIT_LINEARS = {"layer.0": ["l0.q", "l0.mlp"], "layer.1": ["l1.q", "l1.mlp"]}
DENSE = {"l0.q": 4.0, "l0.mlp": 8.0, "l1.q": 2.0, "l1.mlp": 5.0}
LEVELS = (0.3, 0.5, 0.7)
# Pruned norm falls with the level: ratio sqrt(1 - level^2) of the dense norm (any decreasing law works).
PRUNED = {(name, lv): norm * math.sqrt(1 - lv**2) for name, norm in DENSE.items() for lv in LEVELS}


def gap_of(policy: PruningPolicy, n: int = 64, aggregate: str = "geometric_mean") -> float:
    cfg = SRMConfig(aggregate=aggregate)
    return srm_penalty(policy, PRUNED, DENSE, UNIT_LINEARS, n, cfg)


def test_dense_gap_is_exact() -> None:
    dense = PruningPolicy.uniform(UNIT_LINEARS, 0.0)
    assert log_norm_ratios(dense, PRUNED, DENSE, UNIT_LINEARS) == [0.0] * 4
    for n, delta, scale in ((64, 0.05, 1.0), (10, 0.1, 2.5), (1, 0.5, 0.1)):
        expected = 2 * scale / math.sqrt(n) + math.sqrt(math.log(1 / delta) / (2 * n))
        cfg = SRMConfig(delta=delta, scale=scale)
        assert srm_penalty(dense, PRUNED, DENSE, UNIT_LINEARS, n, cfg) == pytest.approx(expected, rel=1e-12)
        assert generalization_gap(1.0, n, delta, scale) == pytest.approx(expected, rel=1e-12)


def test_more_samples_smaller_gap() -> None:
    policy = PruningPolicy.uniform(UNIT_LINEARS, 0.5)
    gaps = [gap_of(policy, n) for n in (1, 8, 64, 512)]
    assert gaps == sorted(gaps, reverse=True) and len(set(gaps)) == 4


def test_more_capacity_larger_gap() -> None:
    gaps = [gap_of(PruningPolicy.uniform(UNIT_LINEARS, lv)) for lv in (0.0, 0.3, 0.5, 0.7)]
    assert gaps == sorted(gaps, reverse=True) and len(set(gaps)) == 4
    # Pruning one unit harder lowers the gap too.
    mixed = PruningPolicy.from_mapping({"layer.0": 0.3, "layer.1": 0.7})
    assert (
        gap_of(PruningPolicy.uniform(UNIT_LINEARS, 0.7))
        < gap_of(mixed)
        < gap_of(PruningPolicy.uniform(UNIT_LINEARS, 0.3))
    )


def test_lam_scales_penalty_and_zero_disables() -> None:
    policy = PruningPolicy.uniform(UNIT_LINEARS, 0.5)
    base = srm_penalty(policy, PRUNED, DENSE, UNIT_LINEARS, 64, SRMConfig(lam=1.0))
    assert srm_penalty(policy, PRUNED, DENSE, UNIT_LINEARS, 64, SRMConfig(lam=0.5)) == pytest.approx(base / 2)
    assert srm_penalty(policy, PRUNED, DENSE, UNIT_LINEARS, 64, SRMConfig(lam=0.0)) == 0.0


def test_geometric_mean_vs_product() -> None:
    logs = [math.log(0.9)] * 224  # a 7B model: 32 layers x 7 matrices, each keeping 90% of its norm
    assert capacity(logs, "geometric_mean") == pytest.approx(0.9)
    product = capacity(logs, "product")
    assert product == pytest.approx(0.9**224) and product < 1e-9
    # The product's penalty no longer tells policies apart; the geometric mean's does.
    logs_harder = [math.log(0.8)] * 224
    prod_diff = generalization_gap(product, 64) - generalization_gap(capacity(logs_harder, "product"), 64)
    geo_diff = generalization_gap(capacity(logs, "geometric_mean"), 64) - generalization_gap(
        capacity(logs_harder, "geometric_mean"), 64
    )
    assert prod_diff < 1e-9 < 0.01 < geo_diff
    # Both rank the same way, and both are 1 at the dense model.
    assert capacity([0.0] * 5, "product") == capacity([0.0] * 5, "geometric_mean") == 1.0
    assert capacity([math.log(0.5), 0.0]) == pytest.approx(math.sqrt(0.5))


def test_levels_matched_despite_float_noise() -> None:
    policy = PruningPolicy.from_mapping({"layer.0": 0.1 * 3, "layer.1": 0.5})
    logs = log_norm_ratios(policy, PRUNED, DENSE, UNIT_LINEARS)
    assert logs[0] == pytest.approx(math.log(math.sqrt(1 - 0.09)))


def test_zero_pruned_norm_gives_zero_capacity() -> None:
    pruned = dict(PRUNED)
    pruned[("l0.q", 0.5)] = 0.0
    logs = log_norm_ratios(PruningPolicy.uniform(UNIT_LINEARS, 0.5), pruned, DENSE, UNIT_LINEARS)
    assert capacity(logs) == 0.0


def test_missing_norms_are_policy_errors() -> None:
    with pytest.raises(PolicyError, match=r"l0\.q.*level 0\.4"):
        log_norm_ratios(PruningPolicy.uniform(UNIT_LINEARS, 0.4), PRUNED, DENSE, UNIT_LINEARS)
    with pytest.raises(PolicyError, match="layer.9"):
        log_norm_ratios(PruningPolicy.uniform(["layer.9"], 0.5), PRUNED, DENSE, UNIT_LINEARS)
    with pytest.raises(PolicyError, match="l1.q"):
        log_norm_ratios(
            PruningPolicy.uniform(UNIT_LINEARS, 0.5), PRUNED, {**DENSE, "l1.q": 0.0}, UNIT_LINEARS
        )
    with pytest.raises(PolicyError, match="no weight matrices"):
        capacity([])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"lam": -0.1}, "lam"),
        ({"scale": 0.0}, "scale"),
        ({"aggregate": "sum"}, "aggregate"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SRMConfig(**kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1.0, 0), "samples"),
        ((1.0, 2.5), "samples"),
        ((1.0, 64, 1.5), "delta"),
        ((1.0, 64, 0.05, -1.0), "scale"),
        ((-0.1, 64), "capacity"),
        ((float("inf"), 64), "capacity"),
    ],
)
def test_gap_validation(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        generalization_gap(*args)
    with pytest.raises(ConfigError, match="aggregate"):
        capacity([0.0], "sum")
