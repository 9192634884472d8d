"""Tests of PruningPolicy: construction, JSON, key, repr, validation, weighted mean."""

from __future__ import annotations

import json

import pytest

from efficientllava.errors import PolicyError
from efficientllava.policy import PruningPolicy

UNITS = [f"layer.{i}" for i in range(12)]


def make(ratios: list[float]) -> PruningPolicy:
    return PruningPolicy.from_mapping(dict(zip(UNITS, ratios, strict=True)))


def test_from_mapping_keeps_order_and_values() -> None:
    policy = PruningPolicy.from_mapping({"layer.1": 0.2, "layer.0": 0.5})
    assert policy.units == ("layer.1", "layer.0")
    assert policy.ratio("layer.0") == 0.5
    assert policy.as_dict() == {"layer.1": 0.2, "layer.0": 0.5}
    with pytest.raises(PolicyError, match="layer.7"):
        policy.ratio("layer.7")


def test_uniform() -> None:
    policy = PruningPolicy.uniform(UNITS, 0.5)
    assert policy.units == tuple(UNITS)
    assert set(policy.as_dict().values()) == {0.5}


def test_json_round_trip(tmp_path) -> None:
    policy = make([0.1 * (i % 8) for i in range(12)])
    assert PruningPolicy.from_json(policy.to_json()) == policy
    path = policy.save(tmp_path / "sub" / "best_policy.json")
    assert PruningPolicy.load(path) == policy
    assert json.loads(path.read_text())["key"] == policy.key
    # A bare {unit: ratio} object is accepted too.
    assert PruningPolicy.from_json(json.dumps(policy.as_dict())) == policy


def test_key_is_stable_and_dedups_float_noise() -> None:
    a = PruningPolicy.from_mapping({"layer.0": 0.3, "layer.1": 0.5})
    b = PruningPolicy.from_mapping({"layer.1": 0.5, "layer.0": 0.1 * 3})  # order and noise differ
    c = PruningPolicy.from_mapping({"layer.0": 0.3, "layer.1": 0.55})
    assert a.key == b.key
    assert a.key != c.key
    assert len({p.key for p in (a, b, c)}) == 2
    # Pinned value: the key must not change between versions or processes (trial tables store it).
    assert a.key == "572b37926bc4c7cd"
    assert PruningPolicy.from_json(a.to_json()).key == a.key


def test_repr_is_short_and_readable() -> None:
    text = repr(make([0.3, 0.55] + [0.5] * 9 + [0.4]))
    assert text.startswith("PruningPolicy(12 units, mean=0.48: layer.0=0.30 layer.1=0.55")
    assert "..." in text and text.endswith("layer.11=0.40)")
    assert "layer.5=" not in text
    short = repr(PruningPolicy.from_mapping({"layer.0": 0.25}))
    assert short == "PruningPolicy(1 unit, mean=0.25: layer.0=0.25)"


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_ratio_outside_range_names_unit_and_value(ratio: float) -> None:
    with pytest.raises(PolicyError, match=r"layer\.3.*outside \[0, 1\)") as info:
        PruningPolicy.from_mapping({"layer.2": 0.1, "layer.3": ratio})
    assert repr(ratio) in str(info.value)


@pytest.mark.parametrize("ratio", ["0.5", None, True])
def test_ratio_not_a_number(ratio: object) -> None:
    with pytest.raises(PolicyError, match="layer.0"):
        PruningPolicy.from_mapping({"layer.0": ratio})  # type: ignore[dict-item]


def test_duplicate_unit_rejected() -> None:
    with pytest.raises(PolicyError, match="more than one"):
        PruningPolicy((("layer.0", 0.1), ("layer.0", 0.2)))


def test_validate_unknown_unit_lists_valid_ones() -> None:
    policy = PruningPolicy.from_mapping({**dict.fromkeys(UNITS, 0.5), "layer.99": 0.1})
    with pytest.raises(PolicyError, match=r"'layer\.99'.*valid units: layer\.0, layer\.1"):
        policy.validate(UNITS)


def test_validate_missing_units() -> None:
    policy = PruningPolicy.from_mapping(dict.fromkeys(UNITS[:10], 0.5))
    with pytest.raises(PolicyError, match=r"no ratio for units layer\.10, layer\.11"):
        policy.validate(UNITS)
    full = PruningPolicy.uniform(UNITS, 0.5)
    assert full.validate(UNITS) is full


def test_load_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(PolicyError, match="nope.json"):
        PruningPolicy.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match=r"bad\.json.*not valid JSON"):
        PruningPolicy.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"ratios": {"layer.0": 2.0}}))
    with pytest.raises(PolicyError, match=r"wrong\.json.*layer\.0"):
        PruningPolicy.load(wrong)
    listy = tmp_path / "list.json"
    listy.write_text("[0.5]")
    with pytest.raises(PolicyError, match=r"list\.json"):
        PruningPolicy.load(listy)


def test_mean_sparsity_is_parameter_weighted() -> None:
    policy = PruningPolicy.from_mapping({"a": 0.0, "b": 0.8})
    assert policy.mean_sparsity({"a": 300, "b": 100}) == pytest.approx(0.2)
    assert policy.mean_sparsity({"a": 1, "b": 1}) == pytest.approx(0.4)
    with pytest.raises(PolicyError, match="'b'|b"):
        policy.mean_sparsity({"a": 1})
