"""Tests of efficientllava.config: loading, defaults, validation errors naming file and key, resources."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from efficientllava.config import (
    DEFAULT_PROBLEM,
    ExperimentConfig,
    check_resources,
    config_from_dict,
    config_to_dict,
    load_config,
)
from efficientllava.data.config import DataConfig
from efficientllava.errors import ConfigError, ResourceError


@pytest.fixture()
def space_file(tmp_path: Path) -> Path:
    p = tmp_path / "spaces" / "toy.yaml"
    p.parent.mkdir()
    p.write_text("params: {x_0: [0, 9]}\n")
    return p


def write(tmp_path: Path, data: object, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_minimal_config_gets_defaults_and_resolves_space(tmp_path, space_file):
    path = write(tmp_path, {"space": "spaces/toy.yaml"})
    cfg = load_config(path)
    assert cfg.name == "exp"  # the file's stem
    assert cfg.problem == DEFAULT_PROBLEM
    assert cfg.space == str(space_file.resolve())
    assert cfg.model.spec == "tiny" and cfg.model.dtype == "auto"
    assert cfg.data == DataConfig()
    assert (cfg.search.rounds, cfg.search.trials_per_round, cfg.search.max_concurrent) == (2, 24, 2)
    assert cfg.search.sampler == "guided" and cfg.search.n_startup_trials == 8
    assert cfg.objective.aggregate == "geometric_mean"
    assert cfg.resources.cpu == 1.0 and cfg.resources.gpu == 0.0
    assert cfg.storage == "runs" and cfg.eval.batch_size == 32


def test_space_falls_back_to_cwd(tmp_path, space_file, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = write(sub, {"space": "spaces/toy.yaml"})
    monkeypatch.chdir(tmp_path)
    assert load_config(path).space == str(space_file.resolve())


def test_full_config_round_trips(tmp_path, space_file):
    data = {
        "name": "toy-1",
        "problem": "efficientllava.testing.toy:QuadraticProblem",
        "model": {"spec": "llava-hf/llava-1.5-7b-hf", "dtype": "bfloat16", "device": "cuda"},
        "data": {"dataset": "scienceqa", "n_shots": 64, "heldout_size": None},
        "space": str(space_file),
        "objective": {"lam": 0.5, "delta": 0.1, "scale": 2, "aggregate": "product"},
        "search": {"rounds": 3, "trials_per_round": 10, "max_concurrent": 4, "seed": 7, "sampler": "nsga2",
                   "n_startup_trials": 0},
        "projector": {"enabled": False, "steps": 5, "lr": 0.01, "top_k": 2, "batch_size": 4, "weight_decay": 0.1},
        "evolution": {"enabled": False, "top_k": 3, "margin": 0},
        "resources": {"cpu": 2, "gpu": 0.5},
        "storage": "s3://bucket/runs",
        "eval": {"batch_size": 8},
    }
    cfg = load_config(write(tmp_path, data))
    assert cfg.resources.gpu == 0.5 and isinstance(cfg.resources.cpu, float)
    assert cfg.objective.scale == 2.0 and isinstance(cfg.objective.scale, float)
    assert cfg.data.heldout_size is None and cfg.search.sampler == "nsga2"
    again = config_from_dict(config_to_dict(cfg), "again.yaml")
    assert again == cfg
    assert isinstance(again, ExperimentConfig)


@pytest.mark.parametrize(
    ("patch", "key", "allowed"),
    [
        ({"serch": {}}, "serch", "allowed keys"),
        ({"search": {"max_concurent": 2}}, "search.max_concurent", "max_concurrent"),
        ({"search": {"max_concurrent": "2"}}, "search.max_concurrent", "expected int"),
        ({"search": {"max_concurrent": 0}}, "search.max_concurrent", ">= 1"),
        ({"search": {"rounds": True}}, "search.rounds", "expected int"),
        ({"search": {"trials_per_round": 2.5}}, "search.trials_per_round", "expected int"),
        ({"search": {"sampler": "cmaess"}}, "search.sampler", "choose one of cmaes, "),
        ({"search": 3}, "search", "must be a mapping"),
        ({"objective": {"delta": 0}}, "objective.delta", "> 0"),
        ({"objective": {"aggregate": "max"}}, "objective.aggregate", "geometric_mean"),
        ({"resources": {"gpu": -1}}, "resources.gpu", ">= 0"),
        ({"resources": {"gpu": "one"}}, "resources.gpu", "expected float"),
        ({"model": {"dtype": "fp8"}}, "model.dtype", "float16"),
        ({"model": {"spec": None}}, "model.spec", "not empty"),
        ({"projector": {"enabled": "yes"}}, "projector.enabled", "expected bool"),
        ({"data": {"n_shots": 0}}, "data.n_shots", ">= 1"),
        ({"data": {"heldout_size": "all"}}, "data.heldout_size", "int or null"),
        ({"data": {"shots": 4}}, "data.shots", "n_shots"),
        ({"data": {"dataset": "sciencqa"}}, "data.dataset", "choose one of synthetic, scienceqa"),
        ({"eval": {"batch_size": 0}}, "eval.batch_size", ">= 1"),
        ({"storage": 5}, "storage", "expected str"),
        ({"problem": "not a class path"}, "problem", "module:ClassName"),
        ({"name": "has space"}, "name", "names a folder"),
        ({"space": "missing.yaml"}, "space", "search-space YAML"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, space_file, patch, key, allowed):
    data = {"space": "spaces/toy.yaml", **patch}
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert key in msg
    assert allowed in msg


def test_every_allowed_aggregate_is_one_scoring_accepts(tmp_path, space_file):
    """The allowed values come from srm.AGGREGATES: one that loads never fails in a trial (and product loads)."""
    from efficientllava.problem import srm_config
    from efficientllava.scoring.srm import AGGREGATES

    assert "product" in AGGREGATES
    for aggregate in AGGREGATES:
        cfg = load_config(write(tmp_path, {"space": str(space_file), "objective": {"aggregate": aggregate}}))
        assert srm_config(cfg).aggregate == aggregate
    with pytest.raises(ConfigError, match="objective.aggregate='mean' is not allowed; choose one of geometric_mean"):
        load_config(write(tmp_path, {"space": str(space_file), "objective": {"aggregate": "mean"}}))


def test_a_registered_sampler_is_a_valid_choice(tmp_path, space_file):
    from efficientllava.search.samplers import _REGISTRY, register_sampler

    register_sampler("config-test-sampler")(lambda search, seed, space: None)
    try:
        cfg = load_config(write(tmp_path, {"space": str(space_file), "search": {"sampler": "config-test-sampler"}}))
        assert cfg.search.sampler == "config-test-sampler"
    finally:
        _REGISTRY.pop("config-test-sampler")


def test_missing_space_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="missing required key space"):
        load_config(write(tmp_path, {"name": "x"}))


@pytest.mark.parametrize("text", ["", "search: [1, 2\n", "- a\n- b\n"])
def test_unreadable_yaml(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_resolve_space_false_keeps_path():
    cfg = config_from_dict({"name": "x", "space": "/does/not/exist.yaml"}, "config.yaml", resolve_space=False)
    assert cfg.space == "/does/not/exist.yaml"


def test_check_resources(tmp_path, space_file):
    def cfg(**res):
        return config_from_dict({"name": "x", "space": str(space_file), "resources": res}, "exp.yaml")

    cpu_only = {"CPU": 2.0, "memory": 1e9}
    check_resources(cfg(cpu=1, gpu=0), cpu_only)
    check_resources(cfg(cpu=0.5, gpu=0.5), {"CPU": 2.0, "GPU": 1.0})
    with pytest.raises(ResourceError, match=r"resources.gpu=1 but the Ray cluster has no GPU; set resources.gpu: 0"):
        check_resources(cfg(gpu=1), cpu_only)
    with pytest.raises(ResourceError, match=r"resources.gpu=2 per trial but the Ray cluster has only 1 GPU"):
        check_resources(cfg(gpu=2), {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ResourceError, match=r"resources.cpu=4 per trial .* only 2 CPU"):
        check_resources(cfg(cpu=4), cpu_only)
