"""Tests of the search machinery (Ray Tune + Optuna + driver + workers) on the toy problem in efficientllava.testing.toy."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import ray
import yaml
from optuna.trial import TrialState

from efficientllava.config import check_resources, config_from_dict
from efficientllava.errors import ConfigError, EfficientLLaVAError, ResourceError
from efficientllava.experiment import STATUS_RUNNING, create_experiment, open_experiment
from efficientllava.search.api import build_problem
from efficientllava.search.driver import EngineContext, run_round
from efficientllava.search.runner import resume_search, run_search
from efficientllava.search.samplers import make_sampler
from efficientllava.search.study import open_study, reconcile_round
from efficientllava.search.workers import NAMESPACE, Workers
from efficientllava.trials import load_trials, overhead_summary, run_overhead

pytestmark = pytest.mark.slow
TOY = "efficientllava.testing.toy:QuadraticProblem"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(ray_session):
    """Every test here runs on the session's Ray cluster."""


def toy_config(tmp_path: Path, *, space: dict, **search) -> object:
    """An ExperimentConfig for the toy problem with its own space file."""
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    search = {"rounds": 2, "trials_per_round": 6, "max_concurrent": 2, "n_startup_trials": 3, **search}
    return config_from_dict(
        {"name": "toy", "problem": TOY, "space": str(path), "search": search, "storage": str(tmp_path / "runs")},
        tmp_path / "exp.yaml",
    )


SPACE4 = {"params": {f"x_{i}": [0, 9] for i in range(4)}, "target": 3}


@contextmanager
def engine(cfg, exp) -> Iterator[tuple]:
    """What the driver sets up for round 0 of `exp`: (problem, context, workers, state), workers started."""
    problem = build_problem(cfg)
    with Workers(cfg, exp.name, cfg.search.max_concurrent, cfg.resources.cpu, cfg.resources.gpu) as workers:
        ctx = EngineContext(exp.root, workers)
        state = problem.initial_state(ctx)
        exp.write_state(STATUS_RUNNING, state, [])
        workers.enter_round(state, problem.round_inputs(state, ctx))
        yield problem, ctx, workers, state


def by_number(exp, r: int) -> dict:
    """Round r's Optuna trials keyed by the engine's trial number."""
    return {t.user_attrs["number"]: t for t in open_study(exp, r).get_trials() if "number" in t.user_attrs}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A whole 2-round x 6-trial search, with failures for x_0 in 0..4 (some trials error)."""
    tmp = tmp_path_factory.mktemp("search")
    cfg = toy_config(tmp, space={**SPACE4, "fail_when": {"x_0": [0, 1, 2, 3, 4]}})
    root = run_search(cfg)
    return cfg, root


def test_search_writes_every_file(finished):
    cfg, root = finished
    assert root.parent == Path(cfg.storage).resolve() and root.name.startswith("toy-")
    for name in ("config.yaml", "study.journal", "state.json", "trials.parquet", "best_policy.json"):
        assert (root / name).is_file(), name
    state = json.loads((root / "state.json").read_text())
    assert state["status"] == "done" and state["round"] == 1 and len(state["history"]) == 2
    assert (root / "spaces" / "round-0.yaml").is_file() and (root / "spaces" / "round-1.yaml").is_file()
    assert len(list((root / "rounds" / "tune").glob("tune-*"))) == 1, "one Tune run for every round"
    for r in (0, 1):
        assert (root / "rounds" / f"round-{r}" / "state.json").is_file()
        assert len(list((root / "trials").glob(f"{r}-*.json"))) == 6
    reloaded = open_experiment(root).load_config()  # the space is copied in and named relative to the directory
    assert reloaded == dataclasses.replace(cfg, space=str(root / "space.yaml"))
    assert (root / "space.yaml").read_text() == Path(cfg.space).read_text()


def test_study_matches_trial_jsons(finished):
    cfg, root = finished
    exp = open_experiment(root)
    df = load_trials(root)
    for r in (0, 1):
        trials = by_number(exp, r)
        assert sorted(trials) == sorted(df[df["round"] == r]["number"]) == list(range(6))
        for row in df[df["round"] == r].itertuples():
            t = trials[row.number]
            if row.status == "COMPLETE":
                assert t.state == TrialState.COMPLETE and t.value == row.objective
                assert t.user_attrs["tune_trial_id"] == row.trial_id
            else:
                assert t.state == TrialState.FAIL
            assert all(df.loc[row.Index, f"param/{k}"] == v for k, v in t.params.items())


def test_errored_trials_are_recorded(finished):
    _, root = finished
    df = load_trials(root)
    errors = df[df["status"] == "ERROR"]
    assert len(errors) >= 1, "the fail_when range should have hit at least one trial"
    assert (errors["param/x_0"] <= 4).all() and (df[df["status"] == "COMPLETE"]["param/x_0"] > 4).all()
    rec = json.loads((root / "trials" / f"{errors.iloc[0]['round']}-{errors.iloc[0]['number']}.json").read_text())
    assert rec["status"] == "ERROR" and rec["error"].startswith("ToyEvaluationError: toy failure")
    assert "Traceback" in rec["traceback"] and rec["objective"] is None
    assert errors["objective"].isna().all() and errors["error"].notna().all()


def test_rounds_narrow_and_best_policy(finished):
    _, root = finished
    df = load_trials(root)
    space1 = yaml.safe_load((root / "spaces" / "round-1.yaml").read_text())
    r0 = df[(df["round"] == 0) & (df["status"] == "COMPLETE")]
    best0 = r0.loc[r0["objective"].idxmax()]
    for name, (lo, hi) in space1["params"].items():
        assert lo <= best0[f"param/{name}"] <= hi and hi - lo <= 4
    # Each round's trials ran with that round's state (the problem's payload, paths relative).
    for r in (0, 1):
        states = {json.dumps(json.loads(p.read_text())["state"]) for p in (root / "trials").glob(f"{r}-*.json")}
        assert states == {json.dumps({"space": f"spaces/round-{r}.yaml"})}
    best = json.loads((root / "best_policy.json").read_text())
    top = df[df["status"] == "COMPLETE"].sort_values(["objective", "round", "number"], ascending=[False, True, True]).iloc[0]
    assert best["objective"] == top["objective"] == df["objective"].max()
    assert (best["round"], best["number"]) == (top["round"], top["number"])
    assert best["policy"] == {f"x_{i}": float(top[f"param/x_{i}"]) for i in range(4)}
    assert {"accuracy", "kept_fraction", "gap"} <= set(best)


def test_load_trials_types(finished):
    _, root = finished
    df = load_trials(root)
    assert list(df.columns[:4]) == ["round", "number", "status", "objective"]
    assert df["round"].dtype == "int64" and df["number"].dtype == "int64"
    assert isinstance(df["status"].dtype, pd.CategoricalDtype)
    for col in ("objective", "accuracy", "gap", "kept_fraction", "eval_s", "wall_s", "policy/x_0"):
        assert df[col].dtype == "float64", col
    assert str(df["retry_of"].dtype) == "Int64"
    assert pd.api.types.is_string_dtype(df["error"]) and pd.api.types.is_string_dtype(df["worker"])
    assert list(df[["round", "number"]].itertuples(index=False)) == sorted(df[["round", "number"]].itertuples(index=False))
    assert (df["eval_s"] >= 0.0).all() and (df["wall_s"] >= df["eval_s"]).all()
    parquet = pd.read_parquet(root / "trials.parquet")
    assert len(parquet) == len(df) == 12
    import efficientllava

    assert efficientllava.load_trials(root).equals(df)


def test_overhead_summary(finished):
    _, root = finished
    summary = overhead_summary(root)
    assert list(summary["round"]) == [0, 1] and list(summary["trials"]) == [6, 6]
    assert (summary["mean_eval_s"] >= 0).all() and (summary["slot_s"] > summary["mean_eval_s"]).all()
    assert ((summary["round_overhead"] > 0) & (summary["round_overhead"] < 1)).all()
    assert (summary["startup_s"] > 0).all() and (summary["seconds"] > summary["startup_s"]).all()
    assert list(summary["workers"]) == [2, 2], "every worker takes trials"
    whole = run_overhead(root)
    assert whole["trials"] == 12 and 0 < whole["overhead"] < 1 and whole["seconds"] > summary["seconds"].sum()


def test_a_live_driver_holds_the_experiment_and_resume_of_finished_search_runs_nothing(finished):
    _, root = finished
    exp = open_experiment(root)
    with exp.driver_lock():  # as a driver still running on this experiment holds it
        with pytest.raises(EfficientLLaVAError, match=r"is being searched by pid \d+"):
            resume_search(root)
    before = sorted(p.name for p in (root / "trials").glob("*.json"))
    assert resume_search(root) == root
    assert sorted(p.name for p in (root / "trials").glob("*.json")) == before
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE], \
        "the search's workers and pool are gone once it returns"


def test_errored_trial_retried_once_on_resume(tmp_path):
    cfg = toy_config(tmp_path, space={**SPACE4, "fail_when": {"x_0": 0}}, trials_per_round=3)
    exp = create_experiment(cfg)
    with engine(cfg, exp) as (problem, ctx, workers, state):
        study = open_study(exp, 0)
        study.enqueue_trial({"x_0": 0, "x_1": 3, "x_2": 3, "x_3": 3})  # the first trial fails
        progress = run_round(exp, cfg, state, problem, ctx, workers, resume=False)
        assert (progress.done, progress.remaining) == (3, 0)
        failed = [t for t in open_study(exp, 0).get_trials() if t.state == TrialState.FAIL]
        assert [t.user_attrs["number"] for t in failed] == [0]
        assert json.loads(exp.trial_path(0, 0).read_text())["status"] == "ERROR"

        # A resume retries the errored trial once (same params, retry_of=0); it fails again and is counted.
        progress = run_round(exp, cfg, state, problem, ctx, workers, resume=True)
    assert progress.done == 3
    trials = open_study(exp, 0).get_trials()
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].params == failed[0].params and retry[0].state == TrialState.FAIL
    assert retry[0].user_attrs["number"] == 3  # a new number: records never depend on Optuna's numbering
    rec = json.loads(exp.trial_path(0, retry[0].user_attrs["number"]).read_text())
    assert rec["status"] == "ERROR" and rec["retry_of"] == 0
    df = load_trials(exp.root)
    assert len(df) == 4 and df["retry_of"].notna().sum() == 1

    # A second resume does not retry a retry.
    assert reconcile_round(exp, 0, 3, retry_errors=True).retried_errors == ()
    assert len(open_study(exp, 0).get_trials()) == 4


def test_a_round_where_every_trial_fails_stops_the_search(tmp_path):
    cfg = toy_config(tmp_path, space={**SPACE4, "fail_when": {"x_0": list(range(10))}}, trials_per_round=2)
    with pytest.raises(EfficientLLaVAError, match=r"round 0: all 2 trials failed; first error \(trial 0-0\): ToyEvaluation"):
        run_search(cfg)
    (root,) = (tmp_path / "runs").iterdir()
    assert json.loads((root / "state.json").read_text())["status"] == "running"  # resumable after a fix
    assert len(load_trials(root)) == 2


def test_tpe_uses_the_studys_history(tmp_path):
    """Trials told to the study before a round starts steer TPE (the mechanism resume relies on)."""
    cfg = toy_config(tmp_path, space=SPACE4, trials_per_round=26, n_startup_trials=5, sampler="tpe")
    exp = create_experiment(cfg)
    with engine(cfg, exp) as (problem, ctx, workers, state):
        study = open_study(exp, 0, sampler=make_sampler(cfg.search, 0, problem.space(state, ctx)))
        dist = optuna.distributions.IntDistribution(0, 9)
        rng = np.random.default_rng(0)
        for _ in range(20):  # a history concentrated around the optimum (3, 3, 3, 3)
            params = {f"x_{i}": int(v) for i, v in enumerate(rng.integers(2, 5, size=4))}
            value = -sum((v - 3) ** 2 for v in params.values())
            study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dist for k in params},
                                                      value=value))
        progress = run_round(exp, cfg, state, problem, ctx, workers, resume=False)
    assert progress.done == 26 and progress.remaining == 0
    new = load_trials(exp.root)
    assert len(new) == 6
    # Uniform sampling on [0, 9]^4 averages -42 (sd of a 6-trial mean ~9); TPE conditioned on the
    # history samples near the optimum (about -14 here; the seeds make this run deterministic).
    assert new["objective"].mean() > -25


def test_resource_check_against_the_cluster(tmp_path):
    cfg = toy_config(tmp_path, space=SPACE4)
    check_resources(cfg)
    with pytest.raises(ResourceError, match="resources.gpu=1 but the Ray cluster has no GPU"):
        check_resources(dataclasses.replace(cfg, resources=dataclasses.replace(cfg.resources, gpu=1.0)))
    with pytest.raises(ResourceError):
        run_search(dataclasses.replace(cfg, resources=dataclasses.replace(cfg.resources, cpu=3.0)))
    assert not (tmp_path / "runs").exists(), "no experiment directory for a search that cannot run"


def test_unknown_problem_class_fails_early(tmp_path):
    cfg = dataclasses.replace(toy_config(tmp_path, space=SPACE4), problem="efficientllava.testing.toy:Nope")
    with pytest.raises(ConfigError, match="has no class 'Nope'"):
        run_search(cfg)
    with pytest.raises(ConfigError, match="already exists"):
        exp = create_experiment(cfg)
        create_experiment(cfg, exp.root)


def test_workers_live_across_rounds_and_all_take_trials(tmp_path):
    """3 rounds: each worker sets up once (the toy's stand-in for a model load) and every worker evaluates."""
    space = {**SPACE4, "sleep_s": 0.3, "setup_s": 0.5}
    cfg = toy_config(tmp_path, space=space, rounds=3, trials_per_round=6)
    root = run_search(cfg)
    df = load_trials(root)
    assert df.groupby("round").size().to_dict() == {0: 6, 1: 6, 2: 6}
    for r in range(3):
        assert set(df[df["round"] == r]["worker"]) == {"w0", "w1"}, f"round {r}: a worker took no trial"
        (infos,) = [json.loads(p.read_text()) for p in (root / "rounds" / f"round-{r}").glob("workers-*.json")]
        assert sorted(i["worker"] for i in infos) == ["w0", "w1"]
        assert len({i["pid"] for i in infos}) == 2 and all(i["problem"]["setups"] == 1 for i in infos)
    (run,) = [json.loads(p.read_text()) for p in (root / "rounds").glob("run-*.json")]
    assert sum(i["trials"] for i in run["workers"]) == 18
    # One Tune run for every round: its forwarders (hold trials keep them busy at round boundaries) started
    # before round 1 and carried every later trial; a Tuner per round would start new ones each round.
    recs = [json.loads(p.read_text()) for p in (root / "trials").glob("*.json")]
    (timing1,) = [json.loads(p.read_text()) for p in (root / "rounds" / "round-1").glob("timing-*.json")]
    later = {rec["forwarder_started_at"] for rec in recs if rec["round"] >= 1}
    assert later and max(later) < timing1["started_at"], "a round started new Tune forwarders"


def test_seed_points_run_first_and_once(tmp_path):
    seeds = {"centre": {f"x_{i}": 4 for i in range(4)}}
    cfg = toy_config(tmp_path, space={**SPACE4, "seeds": seeds}, rounds=1, trials_per_round=3)
    root = run_search(cfg)
    first = json.loads((root / "trials" / "0-0.json").read_text())
    assert first["seed"] == "centre" and first["params"] == seeds["centre"]
    assert sum(json.loads(p.read_text())["seed"] == "centre" for p in (root / "trials").glob("*.json")) == 1
    exp = open_experiment(root)
    assert [t.user_attrs.get("seed") for t in open_study(exp, 0).get_trials()].count("centre") == 1


def test_a_user_error_raised_on_a_worker_reaches_the_caller_as_itself(tmp_path):
    """A bad model spec is only found where the model loads (a worker): the CLI still gets the one-line error."""
    from efficientllava.errors import ModelLoadError

    space = tmp_path / "space.yaml"
    space.write_text((Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml").read_text())
    cfg = config_from_dict({"name": "bad-model", "space": str(space), "model": {"spec": "tinyy"},
                            "search": {"rounds": 1, "trials_per_round": 2, "max_concurrent": 1},
                            "storage": str(tmp_path / "runs")}, tmp_path / "exp.yaml")
    with pytest.raises(ModelLoadError, match="unknown model spec 'tinyy'"):
        run_search(cfg)
