"""The sampler seam: the registry, a plug-in registered from this file alone, and every built-in sampler
running a real (Ray Tune) search on the toy problem; NSGA-II as a true two-objective search."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from efficientllava.config import config_from_dict
from efficientllava.errors import ConfigError
from efficientllava.experiment import open_experiment
from efficientllava.search import samplers
from efficientllava.search.api import Param, Space, SpaceBudget
from efficientllava.search.runner import run_search
from efficientllava.search.samplers import get_sampler, make_sampler, register_sampler, sampler_names
from efficientllava.search.study import open_study
from efficientllava.trials import load_trials

TOY = "efficientllava.testing.toy:QuadraticProblem"
BUILTINS = ("cmaes", "gp", "guided", "nsga2", "random", "tpe")
SPACE = {"params": {"x_0": [0, 9], "x_1": [0, 9], "x_2": [0, 5]}, "weights": {"x_0": 2.0, "x_1": 1.0, "x_2": 1.0},
         "budget": {"target": 3.0, "tolerance": 0.5}}
SEEN: list[tuple[object, int, Space]] = []


@register_sampler("dummy-test")
def dummy(search: object, seed: int, space: Space) -> optuna.samplers.BaseSampler:
    """A plug-in sampler: records what the engine gave it, samples at random."""
    SEEN.append((search, seed, space))
    return optuna.samplers.RandomSampler(seed=seed)


def toy_config(tmp_path: Path, sampler: str, trials: int = 2, concurrent: int = 1) -> object:
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return config_from_dict({
        "name": f"s-{sampler}", "problem": TOY, "space": str(tmp_path / "space.yaml"),
        "search": {"rounds": 1, "trials_per_round": trials, "max_concurrent": concurrent, "sampler": sampler,
                   "n_startup_trials": 1},
        "storage": str(tmp_path / "runs"),
    }, tmp_path / "exp.yaml")


def test_builtins_are_registered_one_file_each():
    assert set(BUILTINS) <= set(sampler_names())
    assert get_sampler("nsga2").multi_objective and not get_sampler("tpe").multi_objective
    files = {p.stem for p in Path(samplers.__file__).parent.glob("*.py") if p.stem != "__init__"}
    assert {get_sampler(n).factory.__module__.rsplit(".", 1)[1] for n in BUILTINS} <= files


def test_tpe_is_multivariate_with_an_explicit_constant_liar():
    cfg = toy_config(Path("/tmp"), "tpe")
    tpe = make_sampler(cfg.search, 0, Space((Param("x", 0, 3),)))
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert tpe._multivariate and tpe._constant_liar


def test_unknown_sampler_and_missing_package_are_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"search.sampler='tpee' is not a registered sampler; choose one of .*tpe"):
        get_sampler("tpee")
    entry = get_sampler("cmaes")
    monkeypatch.setitem(samplers._REGISTRY, "cmaes", type(entry)(entry.name, entry.factory, requires=("nosuchpkg_x",)))
    search = toy_config(Path("/tmp"), "cmaes").search
    with pytest.raises(ConfigError) as err:
        make_sampler(search, 0, Space((Param("x", 0, 3),)))
    assert str(err.value) == ("search.sampler='cmaes' needs the nosuchpkg_x package: "
                              "pip install 'efficientllava[samplers]'")


@pytest.fixture
def ray_cluster(ray_session):
    """The session's Ray cluster."""


@pytest.mark.slow
def test_a_sampler_registered_in_a_test_file_runs_a_search(tmp_path, ray_cluster):
    SEEN.clear()
    root = run_search(toy_config(tmp_path, "dummy-test", trials=3))
    assert len(load_trials(root)) == 3 and (load_trials(root)["status"] == "COMPLETE").all()
    search, seed, space = SEEN[0]
    assert search.sampler == "dummy-test" and isinstance(seed, int)
    # What a budget-preserving sampler needs: each parameter's values and weight, and the budget.
    assert [(p.name, p.low, p.high, p.weight) for p in space.params] == [
        ("x_0", 0, 9, 2.0), ("x_1", 0, 9, 1.0), ("x_2", 0, 5, 1.0)]
    assert space.budget == SpaceBudget(3.0, 0.5) and space["x_2"].level(4) == 4.0


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_sampler_runs_a_two_trial_search(tmp_path, ray_cluster, name):
    root = run_search(toy_config(tmp_path, name))
    df = load_trials(root)
    assert len(df) == 2 and (df["status"] == "COMPLETE").all()
    study = open_study(open_experiment(root), 0, get_objectives(name))
    assert len(study.directions) == (2 if name == "nsga2" else 1)
    best = json.loads((root / "best_policy.json").read_text())
    assert best["objective"] == df["objective"].max()
    if name == "guided":  # the toy's attributions reached the study through Tune (what the sampler reads)
        assert all(set(t.user_attrs["attribution"]) == {"x_0", "x_1", "x_2"} for t in study.trials)
        assert "attribution/x_0" in df.columns
    if name == "nsga2":  # a true two-objective search: objective up, kept fraction down
        assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
        assert all(len(t.values) == 2 for t in study.trials)
        pareto = {tuple(x) for x in best["pareto"]}
        assert (best["round"], best["number"]) in pareto
        from efficientllava.report import write_report

        assert "the searched Pareto set" in write_report(root).read_text()


def get_objectives(name: str) -> tuple:
    from efficientllava.search.api import DEFAULT_OBJECTIVES

    return DEFAULT_OBJECTIVES if name == "nsga2" else DEFAULT_OBJECTIVES[:1]


def test_pareto_set_of_two_objectives():
    from efficientllava.search.api import DEFAULT_OBJECTIVES
    from efficientllava.trials import pareto_set

    def rec(n, objective, kept):
        return {"round": 0, "number": n, "status": "COMPLETE", "objective": objective,
                "result": {"objective": objective, "kept_fraction": kept}}

    records = [rec(0, 0.9, 0.5), rec(1, 0.8, 0.3), rec(2, 0.7, 0.4), rec(3, 0.95, 0.6), rec(4, 0.8, 0.3),
               {"round": 0, "number": 5, "status": "ERROR", "objective": None, "result": {}}]
    assert [r["number"] for r in pareto_set(records, DEFAULT_OBJECTIVES)] == [0, 1, 3, 4]
    assert [r["number"] for r in pareto_set(records, DEFAULT_OBJECTIVES[:1])] == [3]
