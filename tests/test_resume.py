"""End-to-end kill test: SIGKILL a running search mid-round, resume it in a fresh process, check nothing is lost or repeated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import check_resumed, unfinished_trials
from optuna.trial import TrialState
from rayprocs import kill_ray, ray_processes

from efficientllava.search.study import open_study

pytestmark = pytest.mark.slow

ROUNDS, TRIALS = 2, 8
# Six params on [0, 99]: with all-random sampling (n_startup_trials >= trials) two trials drawing the
# same params by chance is ~1e-10, so any duplicate would be a repeat made by the machinery.
SPACE = {"params": {f"x_{i}": [0, 99] for i in range(6)}, "target": 30, "sleep_s": 0.6}


def runner(args: list[str], ray_tmp: str, log: Path) -> subprocess.Popen:
    """Start `python -m efficientllava.cli ARGS` in its own session with a private Ray temp dir."""
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "efficientllava.cli", *args],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )


def records(exp_root: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((exp_root / "trials").glob("*.json"))}


def test_sigkill_mid_round_then_resume(tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({
        "name": "kill",
        "problem": "efficientllava.testing.toy:QuadraticProblem",
        "space": "space.yaml",
        "search": {"rounds": ROUNDS, "trials_per_round": TRIALS, "max_concurrent": 2, "n_startup_trials": TRIALS},
    }))
    root = tmp_path / "exp"
    # Short paths: Ray's unix sockets live under the temp dir and must stay under 107 characters.
    tmp1, tmp2 = tempfile.mkdtemp(prefix="elr", dir="/tmp"), tempfile.mkdtemp(prefix="elr", dir="/tmp")
    try:
        proc = runner(["search", str(tmp_path / "exp.yaml"), "--dir", str(root), "--no-heldout"], tmp1,
                      tmp_path / "run.log")
        deadline = time.time() + 150
        while len(list((root / "trials").glob("0-*.json"))) < 3:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.time() < deadline, "no trials finished in time:\n" + (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kill_ray(tmp1)  # trial actors may outlive the killed group briefly; the snapshot must come after
        assert not ray_processes(tmp1), "orphan Ray processes survived the kill"

        before = {name: (root / "trials" / name).read_bytes() for name in records(root)}
        n_before = len(before)
        assert 3 <= n_before < TRIALS, f"kill should land mid round 0, got {sorted(before)}"
        unfinished = unfinished_trials(root, before)

        resumed = runner(["resume", str(root), "--no-heldout"], tmp2, tmp_path / "resume.log")
        rc = resumed.wait(timeout=240)
        assert rc == 0, (tmp_path / "resume.log").read_text()[-5000:]
        kill_ray(tmp2)
    finally:
        for marker in (tmp1, tmp2):
            kill_ray(marker)
            shutil.rmtree(marker, ignore_errors=True)

    check_resumed(root, before, unfinished, ROUNDS, TRIALS)
    assert "resuming with" in (tmp_path / "resume.log").read_text()


def _toy_experiment(tmp_path: Path):
    from efficientllava.config import config_from_dict
    from efficientllava.experiment import create_experiment

    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"params": {"x_0": [0, 99]}}))
    cfg = config_from_dict({"name": "rec", "problem": "efficientllava.testing.toy:QuadraticProblem",
                            "space": str(tmp_path / "space.yaml")}, tmp_path / "exp.yaml")
    return create_experiment(cfg, tmp_path / "exp")


def _record(exp, number: int, x: int, status: str) -> None:
    from efficientllava.experiment import write_json_atomic

    write_json_atomic(exp.trial_path(0, number), {
        "round": 0, "number": number, "status": status, "params": {"x_0": x},
        "objective": float(-x) if status == "COMPLETE" else None,
        "result": {"attribution/x_0": float(x)} if status == "COMPLETE" else None,
        "error": None if status == "COMPLETE" else "ValueError: boom",
    })


def test_reconcile_tells_fails_and_reenqueues_once(tmp_path):
    """Each stale case of a killed round, without Ray: results on disk are told, the rest re-run once."""
    from efficientllava.search.study import reconcile_round

    exp = _toy_experiment(tmp_path)
    study = open_study(exp, 0)
    trials = [study.ask() for _ in range(5)]
    for i, t in enumerate(trials):
        t.suggest_int("x_0", i, i)
        t.set_user_attr("number", i)
    study.tell(trials[0], 0.0)
    _record(exp, 0, 0, "COMPLETE")  # finished normally
    _record(exp, 1, 1, "COMPLETE")  # killed after its JSON, before Tune told Optuna
    # trial 2: killed mid-evaluation (RUNNING, no JSON)
    _record(exp, 3, 3, "ERROR")  # errored, killed before Optuna heard of it
    study.tell(trials[4], state=TrialState.FAIL)
    _record(exp, 4, 4, "ERROR")  # errored normally

    p = reconcile_round(exp, 0, 6, retry_errors=True)
    assert p.told == (1, 3) and p.interrupted == (2,) and p.retried_errors == (3, 4)
    assert (p.done, p.remaining) == (2, 4)  # trials 0 and 1; the re-enqueued three run again
    after = open_study(exp, 0).get_trials()
    assert after[1].state == TrialState.COMPLETE and after[1].value == -1.0
    assert after[1].user_attrs["attribution"] == {"x_0": 1.0}  # told from the record, attributions too
    assert [t.state for t in after[2:5]] == [TrialState.FAIL] * 3
    waiting = [t for t in after if t.state == TrialState.WAITING]
    assert [(t.user_attrs["retry_of"], t.user_attrs["retry_reason"]) for t in waiting] == [
        (2, "interrupted"), (3, "error"), (4, "error")]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [{"x_0": 2}, {"x_0": 3}, {"x_0": 4}]

    again = reconcile_round(exp, 0, 6, retry_errors=True)  # idempotent: nothing enqueued twice
    assert (again.done, again.remaining, again.told, again.interrupted, again.retried_errors) == (2, 4, (), (), ())
    assert len(open_study(exp, 0).get_trials()) == 8

    without = reconcile_round(exp, 0, 6, retry_errors=False)
    assert without.remaining == 4


def test_repair_journal_drops_a_torn_last_line(tmp_path):
    from efficientllava.search.study import repair_journal

    exp = _toy_experiment(tmp_path)
    study = open_study(exp, 0)
    study.tell(study.ask(), 1.0)
    assert not repair_journal(exp)
    good = exp.journal_path.read_bytes()
    with open(exp.journal_path, "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "par')  # a write cut by SIGKILL
    assert repair_journal(exp)
    assert exp.journal_path.read_bytes() == good
    reopened = open_study(exp, 0)
    reopened.tell(reopened.ask(), 2.0)
    assert [t.value for t in open_study(exp, 0).get_trials()] == [1.0, 2.0]


def test_reconcile_cases_of_a_driver_killed_around_tune(tmp_path):
    """Trial identity is the engine's number: a FAIL that lost its record re-runs once; a trial killed
    before it got a number never ran (failed, not re-run); history added without numbers counts."""
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    from efficientllava.search.study import reconcile_round

    exp = _toy_experiment(tmp_path)
    study = open_study(exp, 0)
    study.add_trial(create_trial(params={"x_0": 7}, distributions={"x_0": IntDistribution(0, 99)}, value=-7.0))
    a, b = study.ask(), study.ask()
    a.suggest_int("x_0", 5, 5)
    a.set_user_attr("number", 0)
    study.tell(a, state=TrialState.FAIL)  # Tune failed it (worker died); the driver died before the record
    b.suggest_int("x_0", 6, 6)  # asked, then killed before the searcher numbered it

    p = reconcile_round(exp, 0, 3, retry_errors=False)
    assert p.interrupted == (0,) and p.told == ()
    assert (p.done, p.remaining) == (1, 2)  # the history trial counts; the retry of 0 runs again
    after = open_study(exp, 0).get_trials()
    assert after[2].state == TrialState.FAIL  # the unnumbered one, failed and not re-enqueued
    waiting = [t for t in after if t.state == TrialState.WAITING]
    assert [(t.user_attrs["retry_of"], t.system_attrs["fixed_params"]) for t in waiting] == [(0, {"x_0": 5})]
    assert reconcile_round(exp, 0, 3, retry_errors=True).interrupted == ()  # idempotent


def test_journal_syncs_at_state_changes_only(tmp_path, monkeypatch):
    """One fsync per trial (at its tell), not one per parameter; everything before it is flushed with it."""
    import optuna
    from optuna.distributions import IntDistribution

    import efficientllava.journal as journal

    exp = _toy_experiment(tmp_path)
    study = open_study(exp, 0)
    syncs = []
    monkeypatch.setattr(journal.os, "fsync", lambda fd: syncs.append(fd))
    dist = {f"x_{i}": IntDistribution(0, 9) for i in range(12)}
    trial = study.ask(fixed_distributions=dist)
    trial.set_user_attr("number", 0)
    assert syncs == []
    study.tell(trial, 1.0)
    assert len(syncs) == 1
    reread = optuna.load_study(study_name="round-0", storage=exp.storage()).trials[0]
    assert reread.params == trial.params and reread.user_attrs == {"number": 0} and reread.value == 1.0
