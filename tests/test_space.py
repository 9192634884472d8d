"""Tests of search spaces: shipped YAMLs, malformed inputs, grids, round trips, budget repair."""

from __future__ import annotations

from pathlib import Path

import pytest

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.policy import PruningPolicy
from efficientllava.space import (
    Budget,
    SearchSpace,
    budget_status,
    dump_space,
    load_space,
    repair,
    space_from_dict,
)

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"

GOOD = """\
granularity: layer
levels: [0.0, 0.25, 0.5, 0.75]
budget: {target: 0.5}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_spaces_load() -> None:
    tiny = load_space(SPACES / "tiny.yaml")
    assert tiny.granularity == "sublayer" and tiny.method == "sparsegpt" and tiny.pattern == "unstructured"
    assert tiny.levels == tuple(round(0.7 + 0.02 * i, 2) for i in range(15))
    assert tiny.budget.target == 0.92
    for name, layers in (("llava-1.5-7b", 32), ("llava-1.5-13b", 40)):
        space = load_space(SPACES / f"{name}.yaml")
        assert space.name == name and space.granularity == "sublayer"
        assert len(space.levels) == 17 and space.levels[1] == 0.05 and space.levels[-1] == 0.8
        opts = space.method_options
        assert (opts.percdamp, opts.blocksize, space.budget.target) == (0.01, 128, 0.5)
        assert len(space.unit_names(layers)) == 2 * layers


def test_grid_includes_stop_within_float_tolerance(tmp_path) -> None:
    path = write(
        tmp_path, "granularity: layer\nlevels: {start: 0.1, stop: 0.7, step: 0.2}\nbudget: {target: 0.5}\n"
    )
    assert load_space(path).levels == (0.1, 0.3, 0.5, 0.7)
    path = write(
        tmp_path, "granularity: layer\nlevels: {start: 0.0, stop: 0.3, step: 0.1}\nbudget: {target: 0.2}\n"
    )
    assert load_space(path).levels == (0.0, 0.1, 0.2, 0.3)  # 0.1 * 3 = 0.30000000000000004 is kept


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (GOOD + "bogus: 1\n", "bogus"),
        (GOOD.replace("layer", "block"), "granularity"),
        (GOOD + "method: obs\n", "method"),
        (GOOD + "method: [sparsegpt]\n", "method"),
        (GOOD.replace("[0.0, 0.25, 0.5, 0.75]", "[]"), "levels"),
        (GOOD.replace("[0.0, 0.25, 0.5, 0.75]", "[0.0, 1.0]"), "levels"),
        (GOOD.replace("[0.0, 0.25, 0.5, 0.75]", "[0.0, -0.1]"), "levels"),
        (GOOD.replace("[0.0, 0.25, 0.5, 0.75]", "[0.0, half]"), "levels"),
        (GOOD.replace("[0.0, 0.25, 0.5, 0.75]", "0.5"), "levels"),
        (GOOD.replace("[0.0, 0.25, 0.5, 0.75]", "{start: 0, stop: 0.5}"), "levels"),
        (GOOD.replace("[0.0, 0.25, 0.5, 0.75]", "{start: 0, stop: 0.5, step: 0.1, by: 2}"), "levels"),
        (GOOD + "pattern: '2:4'\n", "levels"),
        (GOOD + "pattern: '4:2'\n", "pattern"),
        (GOOD + "pattern: blocky\n", "pattern"),
        (GOOD.replace("target: 0.5", "target: 1.0"), "budget.target"),
        (GOOD.replace("target: 0.5", "target: 0"), "budget.target"),
        (GOOD.replace("target: 0.5", "target: high"), "budget.target"),
        (GOOD.replace("{target: 0.5}", "{tolerance: 0.1}"), "target"),
        (GOOD.replace("{target: 0.5}", "{target: 0.5, over_budget: ignore}"), "budget.over_budget"),
        (GOOD.replace("{target: 0.5}", "{target: 0.5, slack: 1}"), "slack"),
        (GOOD.replace("{target: 0.5}", "0.5"), "budget"),
        (GOOD.replace("{target: 0.5}", "{target: 0.5, kind: flops}"), "budget.kind"),
        (GOOD + "calibration: {percdamp: -1}\n", "calibration.percdamp"),
        (GOOD + "calibration: {blocksize: 1.5}\n", "calibration.blocksize"),
        (GOOD + "calibration: {damp: 1}\n", "damp"),
        (GOOD + "method: {name: sparsegpt, percdamp: 0}\n", "method.percdamp"),
        (GOOD + "method: {name: sparsegpt, damp: 1}\n", "damp"),
        (GOOD + "method: {name: wanda, blocksize: 64}\n", "blocksize"),
        (GOOD + "method: {percdamp: 0.1}\n", "name"),
        (GOOD + "method: {name: obs}\n", "obs"),
        (GOOD + "unit_levels: {layer.2.mlp: [0.1]}\n", "unit_levels"),
        (GOOD + "unit_levels: {layer.2: [0.1, 1.2]}\n", "unit_levels.layer.2"),
        (GOOD + "unit_levels: {layer.2: []}\n", "unit_levels.layer.2"),
        (GOOD + "unit_levels: [layer.2]\n", "unit_levels"),
        ("granularity: layer\nbudget: {target: 0.5}\n", "levels"),
        ("- just\n- a list\n", "mapping"),
        ("granularity: [layer\n", "YAML"),
    ],
)
def test_malformed_space_names_file_and_key(tmp_path, text: str, key: str) -> None:
    path = write(tmp_path, text, "broken-space.yaml")
    with pytest.raises(ConfigError, match="broken-space.yaml") as info:
        load_space(path)
    assert key in str(info.value)


def test_nm_pattern_accepts_zero_and_n_over_m(tmp_path) -> None:
    path = write(tmp_path, GOOD.replace("[0.0, 0.25, 0.5, 0.75]", "[0.0, 0.5]") + "pattern: '2:4'\n")
    space = load_space(path)
    assert space.nm == (2, 4) and space.levels == (0.0, 0.5)


def test_missing_file_is_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="absent.yaml"):
        load_space(tmp_path / "absent.yaml")


def test_dump_load_round_trip(tmp_path) -> None:
    space = load_space(SPACES / "llava-1.5-7b.yaml").with_unit_levels(
        {"layer.3.mlp": [0.5, 0.6], "layer.1.attn": [0.0]}
    )
    again = load_space(dump_space(space, tmp_path / "out" / "evolved.yaml"))
    assert again == space
    assert again.levels_for("layer.3.mlp") == (0.5, 0.6)
    assert again.levels_for("layer.0.mlp") == space.levels
    assert [u for u, _ in again.unit_levels] == ["layer.1.attn", "layer.3.mlp"]  # model order


def test_with_unit_levels_merges_and_validates() -> None:
    space = SearchSpace("layer", (0.0, 0.5), Budget(0.5))
    one = space.with_unit_levels({"layer.1": [0.2, 0.4]})
    two = one.with_unit_levels({"layer.0": [0.3]})
    assert two.levels_for("layer.1") == (0.2, 0.4) and two.levels_for("layer.0") == (0.3,)
    assert space.levels_for("layer.1") == (0.0, 0.5)  # the original is untouched
    with pytest.raises(ConfigError, match="layer.1.mlp"):
        space.with_unit_levels({"layer.1.mlp": [0.2]})
    with pytest.raises(ConfigError, match="layer.9"):
        one.with_unit_levels({"layer.9": [0.2]}).unit_names(4)


def test_space_from_dict_defaults() -> None:
    space = space_from_dict({"granularity": "sublayer", "levels": [0.5, 0.0, 0.5], "budget": {"target": 0.3}})
    assert space.levels == (0.0, 0.5)  # sorted, unique
    assert (space.method, space.pattern, space.budget.over_budget) == ("sparsegpt", "unstructured", "project")  # issue 8: budget-exact scoring is the default


# -- budget and repair ----------------------------------------------------------------------------

UNITS = ["layer.0", "layer.1", "layer.2", "layer.3"]
WEIGHTS = {"layer.0": 100, "layer.1": 100, "layer.2": 200, "layer.3": 400}
SPACE = SearchSpace("layer", tuple(round(0.1 * i, 1) for i in range(9)), Budget(0.5, tolerance=0.01))


def test_budget_status() -> None:
    mean, ok = budget_status(PruningPolicy.uniform(UNITS, 0.5), SPACE.budget, WEIGHTS)
    assert mean == pytest.approx(0.5) and ok
    mean, ok = budget_status(PruningPolicy.uniform(UNITS, 0.49), SPACE.budget, WEIGHTS)
    assert ok  # within tolerance
    mean, ok = budget_status(PruningPolicy.uniform(UNITS, 0.4), SPACE.budget, WEIGHTS)
    assert mean == pytest.approx(0.4) and not ok
    assert SPACE.budget.shortfall_penalty(0.4) == pytest.approx(0.09)
    assert SPACE.budget.shortfall_penalty(0.6) == 0.0


def test_repair_within_budget_is_identity() -> None:
    policy = PruningPolicy.from_mapping({"layer.0": 0.8, "layer.1": 0.0, "layer.2": 0.3, "layer.3": 0.7})
    assert repair(policy, SPACE, WEIGHTS) is policy


@pytest.mark.parametrize(
    "ratios",
    [[0.0, 0.1, 0.2, 0.3], [0.8, 0.0, 0.1, 0.2], [0.3, 0.7, 0.0, 0.45], [0.0, 0.0, 0.0, 0.0]],
)
def test_repair_meets_budget_monotone_order_preserving(ratios: list[float]) -> None:
    policy = PruningPolicy.from_mapping(dict(zip(UNITS, ratios, strict=True)))
    fixed = repair(policy, SPACE, WEIGHTS)
    assert budget_status(fixed, SPACE.budget, WEIGHTS)[1]
    assert fixed.units == policy.units
    for unit in UNITS:
        assert fixed.ratio(unit) >= policy.ratio(unit)  # never lowers
    for a in UNITS:
        for b in UNITS:
            if policy.ratio(a) < policy.ratio(b):
                assert fixed.ratio(a) <= fixed.ratio(b)  # relative order kept
    assert repair(policy, SPACE, WEIGHTS) == fixed  # deterministic


def test_repair_uses_smallest_shift() -> None:
    policy = PruningPolicy.from_mapping(dict(zip(UNITS, [0.0, 0.1, 0.2, 0.3], strict=True)))
    fixed = repair(policy, SPACE, WEIGHTS)
    # Mean is 0.225; two steps up gives 0.425 (short), three gives ~0.525 (meets the 0.49 floor).
    assert fixed.as_dict() == pytest.approx({"layer.0": 0.3, "layer.1": 0.4, "layer.2": 0.5, "layer.3": 0.6})


def test_repair_keeps_shifting_past_clipped_units() -> None:
    policy = PruningPolicy.from_mapping(dict(zip(UNITS, [0.0, 0.0, 0.0, 0.8], strict=True)))
    weights = {"layer.0": 300, "layer.1": 300, "layer.2": 300, "layer.3": 100}
    fixed = repair(policy, SPACE, weights)
    assert fixed.ratio("layer.3") == 0.8  # already at the top
    assert budget_status(fixed, SPACE.budget, weights)[1]
    assert fixed.ratio("layer.0") == pytest.approx(0.5)


def test_repair_uses_each_units_own_levels() -> None:
    space = SPACE.with_unit_levels({"layer.3": [0.0, 0.7]})
    policy = PruningPolicy.from_mapping(dict(zip(UNITS, [0.2, 0.2, 0.2, 0.0], strict=True)))
    fixed = repair(policy, space, WEIGHTS)
    assert fixed.ratio("layer.3") == 0.7  # one step on its own list
    assert fixed.ratio("layer.0") == pytest.approx(0.3)


def test_repair_off_grid_ratio_never_lowered() -> None:
    policy = PruningPolicy.from_mapping(dict(zip(UNITS, [0.05, 0.05, 0.05, 0.05], strict=True)))
    fixed = repair(policy, SPACE, WEIGHTS)
    assert all(r >= 0.49 for r in fixed.as_dict().values())


def test_repair_unreachable_budget_raises() -> None:
    space = SearchSpace("layer", (0.0, 0.2), Budget(0.5))
    with pytest.raises(PolicyError, match="cannot meet its budget"):
        repair(PruningPolicy.uniform(UNITS, 0.0), space, WEIGHTS)


def test_method_with_options_and_the_old_calibration_section(tmp_path) -> None:
    new = load_space(write(tmp_path, GOOD + "method: {name: sparsegpt, percdamp: 0.05, blocksize: 64}\n"))
    assert new.method == "sparsegpt" and new.method_options.as_dict() == {"percdamp": 0.05, "blocksize": 64}
    old = load_space(write(tmp_path, GOOD + "method: sparsegpt\ncalibration: {percdamp: 0.05, blocksize: 64}\n"))
    assert old == new
    assert "calibration" not in new.to_dict() and new.to_dict()["method"]["blocksize"] == 64
    assert load_space(dump_space(new, tmp_path / "again.yaml")) == new
    # Old round files wrote `calibration:` for every method; a method without those options ignores them.
    wanda = load_space(write(tmp_path, GOOD + "method: wanda\ncalibration: {percdamp: 0.01, blocksize: 128}\n"))
    assert wanda.method == "wanda" and wanda.to_dict()["method"] == "wanda"
    obs = load_space(write(tmp_path, GOOD + "method: obs_mask\ncalibration: {percdamp: 0.2, blocksize: 128}\n"))
    assert obs.method_options.as_dict() == {"percdamp": 0.2}
    assert SearchSpace("layer", (0.0, 0.5), Budget(0.5), method="obs_mask").method_options.as_dict() == {"percdamp": 0.01}
