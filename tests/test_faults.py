"""Fault injection: damaged files, a full disk, two drivers, a moved directory (efficientllava.testing.faults).

Most cases run in-process without Ray: `resume` runs for real up to where it would start Ray (lock,
checks, journal / state rebuild), then the study is reconciled as the driver would. One slow test
starts Ray: a disk that fills mid-search, then `mv D E` and two concurrent `resume E`.
The full table (every file x damage x command) is `python benchmarks/faults_table.py`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from efficientllava.experiment import open_experiment
from efficientllava.policy import PruningPolicy
from efficientllava.testing.faults import (
    DAMAGES,
    FILES,
    ROUNDS,
    TRIALS,
    build_experiment,
    format_table,
    run_case,
    run_cli,
    write_toy_config,
)

# Which files each reader touches (the full cross product is the benchmark script's table).
READER_CASES = [(cmd, f) for cmd, files in (
    ("trials", ("config.yaml", "trials/0-1.json")),
    ("report", ("state.json", "trials/0-1.json", "best_policy.json", "heldout.json", "trials.parquet")),
) for f in files]


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    """A finished and an interrupted toy experiment directory, built once (no Ray)."""
    base = tmp_path_factory.mktemp("faults")
    return {kind: build_experiment(base / kind, interrupted=kind == "interrupted")
            for kind in ("finished", "interrupted")}


def test_every_damaged_file_then_resume_is_an_error_line_or_a_recovery(experiments, tmp_path):
    """Each file of both experiments x delete / truncate / garble, then `resume` up to Ray."""
    rows = [run_case(base, tmp_path / "work", f, how, "resume", interrupted=kind == "interrupted")
            for kind, base in experiments.items() for f in FILES for how in DAMAGES]
    print("\n" + format_table(rows))
    assert all(r.ok for r in rows), format_table([r for r in rows if not r.ok])
    by = {(r.file, r.damage): r for r in rows if r.rc != "-"}
    # Records first: the journal and state.json are rebuilt (nothing re-evaluated), never an error.
    for f in ("study.journal", "state.json"):
        assert all(by[(f, how)].rc == "ray" for how in DAMAGES), f
    assert "rebuilt from" in by[("study.journal", "garble")].message
    # What the directory cannot rebuild is one line naming the file.
    assert all(by[("config.yaml", how)].rc == 2 for how in DAMAGES)
    assert by[("trials/0-1.json", "garble")].rc == 2 and "0-1.json" in by[("trials/0-1.json", "garble")].message


@pytest.mark.parametrize(("command", "file"), READER_CASES)
def test_readers_on_a_damaged_file(experiments, tmp_path, command, file):
    for how in ("garble",) if command == "report" else ("delete", "garble"):  # report: ~2 s a run (plots)
        row = run_case(experiments["finished"], tmp_path / "work", file, how, command, interrupted=False)
        assert row.ok, format_table([row])
        if file in ("best_policy.json", "heldout.json", "trials.parquet"):  # derived: healed or left out
            assert row.rc == 0, format_table([row])


def test_journal_rebuilt_from_records_holds_them_all_byte_identical(experiments, tmp_path):
    from efficientllava.search.study import open_study

    for how in DAMAGES:
        row = run_case(experiments["interrupted"], tmp_path / "w", "study.journal", how, "resume", interrupted=True)
        assert row.ok and row.rc == "ray", format_table([row])
        exp = open_experiment(tmp_path / "w")
        for rec_path in exp.trial_paths():
            rec = json.loads(rec_path.read_text())
            assert rec_path.read_bytes() == (experiments["interrupted"] / "trials" / rec_path.name).read_bytes()
            held = {t.user_attrs["number"]: t for t in open_study(exp, rec["round"]).get_trials()
                    if "number" in t.user_attrs}
            t = held[rec["number"]]
            assert t.params == rec["params"] and t.value == rec["objective"], rec_path.name


def test_moved_directory_resumes(experiments, tmp_path):
    moved = tmp_path / "elsewhere" / "E"
    moved.parent.mkdir()
    shutil.copytree(experiments["interrupted"], tmp_path / "D")
    os.rename(tmp_path / "D", moved)
    assert "space: space.yaml" in (moved / "config.yaml").read_text()
    assert str(experiments["interrupted"]) not in "".join(p.read_text(errors="replace") for p in moved.rglob("*.json"))
    rc, err = run_cli(["resume", str(moved), "--no-heldout"])
    assert rc == "ray", err
    cfg = open_experiment(moved).load_config()
    assert Path(cfg.space) == moved / "space.yaml"


# -- the driver lock ---------------------------------------------------------------------------------------------

def _hold_lock(root: Path) -> subprocess.Popen:
    """A process that holds `root`'s driver lock until killed."""
    code = ("import sys, time\nfrom efficientllava.experiment_lock import driver_lock\n"
            "with driver_lock(sys.argv[1], 'efficientllava resume'):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_driver_refused_at_once_and_a_killed_holder_is_taken_over(experiments, tmp_path):
    root = tmp_path / "D"
    shutil.copytree(experiments["interrupted"], root)
    holder = _hold_lock(root)
    try:
        t0 = time.perf_counter()
        rc, err = run_cli(["resume", str(root), "--no-heldout"])
        refused_s = time.perf_counter() - t0
        assert rc == 2 and err.count("\n") == 1, err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err and "efficientllava resume" in err, err
        assert refused_s < 5, refused_s
        for cmd in (["trials", str(root)], ["report", str(root)]):  # readers never need the lock
            assert run_cli(cmd)[0] == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rc, err = run_cli(["resume", str(root), "--no-heldout"])  # the kernel dropped the dead holder's flock
    assert rc == "ray", err


def test_lease_of_a_holder_on_another_host(experiments, tmp_path):
    from efficientllava.experiment_lock import LEASE_S

    root = tmp_path / "D"
    shutil.copytree(experiments["interrupted"], root)
    lock = root / ".driver.lock"
    lock.write_text(json.dumps({"host": "node-7", "pid": 4242, "started_at": time.time() - 60,
                                "heartbeat_at": time.time() - 5, "command": "efficientllava resume"}))
    rc, err = run_cli(["resume", str(root), "--no-heldout"])
    assert rc == 2 and "pid 4242 on host node-7" in err and "lease" in err, err
    lock.write_text(json.dumps({"host": "node-7", "pid": 4242, "started_at": 0, "heartbeat_at": time.time() - LEASE_S - 1}))
    rc, err = run_cli(["resume", str(root), "--no-heldout"])
    assert rc == "ray", err


# -- disk full ---------------------------------------------------------------------------------------------------

def _small_disk(path: Path) -> bool:
    """Mount a 4 MB tmpfs at `path` (False where mounting is not allowed)."""
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_is_one_line_and_the_directory_stays_resumable(experiments, tmp_path, monkeypatch):
    """On a real full tmpfs where this machine allows mounting one, else with fsync failing as ENOSPC."""
    disk = tmp_path / "disk"
    real = _small_disk(disk)
    try:
        root = disk / "D"
        shutil.copytree(experiments["finished"], root)
        before = {p.name: p.read_bytes() for p in (root / "trials").glob("*.json")}
        (root / "state.json").unlink()  # resume must write a rebuilt one
        if real:
            with open(disk / "filler", "wb") as fh:  # fill the disk
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
            commands = (["resume", str(root), "--no-heldout"], ["report", str(root)],
                        ["trials", str(root), "--csv", str(root / "t.csv")])
        else:
            def no_space(fd: int) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(os, "fsync", no_space)
            commands = (["resume", str(root), "--no-heldout"],)
        for argv in commands:
            rc, err = run_cli(argv)
            lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
            assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
            assert "no space left on device" in lines[0] and f"efficientllava resume {root}" in lines[0], err
        monkeypatch.undo()
        if real:
            (disk / "filler").unlink()  # free space
        rc, err = run_cli(["resume", str(root), "--no-heldout"])
        assert rc == "ray", err
        assert {p.name: p.read_bytes() for p in (root / "trials").glob("*.json")} == before
        assert open_experiment(root).read_state()["round"] == ROUNDS - 1
    finally:
        if real:
            subprocess.run(["umount", str(disk)], check=False)


# -- CLI odds and ends -------------------------------------------------------------------------------------------

def test_search_checks_before_ray_and_leaves_no_directory(tmp_path):
    cfg = write_toy_config(tmp_path, space={"target": 3})  # no params
    rc, err = run_cli(["search", str(cfg), "--dir", str(tmp_path / "D")])
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "params" in err, err
    assert not (tmp_path / "D").exists()


@pytest.mark.parametrize(("patch", "words"), [
    ({"model": {"spec": "./no-such-checkpoint"}}, "unknown model spec"),
    ({"data": {"dataset": "vqa", "source": "/no/such/data.parquet"}}, "no such file"),
    ({"space": "missing-space.yaml"}, "is not a file"),
])
def test_pruning_search_checks_model_data_and_space_before_ray(tmp_path, patch, words):
    repo = Path(__file__).resolve().parents[1]
    cfg = {"name": "early", "space": str(repo / "search_spaces" / "tiny.yaml"), **patch}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    rc, err = run_cli(["search", str(tmp_path / "exp.yaml"), "--dir", str(tmp_path / "D")])
    assert rc == 2 and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "D").exists()


def test_trials_csv_into_a_missing_folder(experiments, tmp_path):
    rc, err = run_cli(["trials", str(experiments["finished"]), "--csv", str(tmp_path / "nope" / "t.csv")])
    assert rc == 2 and "nope" in err and err.count("\n") == 1, err


def test_evaluate_policy_reads_every_policy_file_the_product_writes(tmp_path):
    ratios = {"layer.0": 0.5, "layer.1": 0.25}
    files = {
        "best_policy.json": {"policy": ratios, "round": 0, "number": 3, "objective": 0.9, "params": {}},
        "0-3.json": {"round": 0, "number": 3, "status": "COMPLETE", "params": {"layer.0": 2},
                     "result": {"objective": 0.9, **{f"policy/{u}": r for u, r in ratios.items()}}},
        "bare.json": ratios,
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    PruningPolicy.from_mapping(ratios).save(tmp_path / "policy.json")  # an export's
    for name in (*files, "policy.json"):
        assert PruningPolicy.load(tmp_path / name).as_dict() == ratios, name
    (tmp_path / "empty.json").write_text("{}")
    rc, err = run_cli(["evaluate", "--policy", str(tmp_path / "empty.json")])
    assert rc == 2 and "empty.json" in err and "no units" in err and err.count("\n") == 1, err


def test_projector_update_that_does_not_lower_the_loss_is_not_adopted(tmp_path):
    import torch

    from efficientllava.config import config_from_dict
    from efficientllava.problem.pruning import PruningProblem
    from efficientllava.search.api import LocalContext, RoundState

    class Worker:
        def __init__(self, after: float | None) -> None:
            self.after = after

        def train_projector(self, top):
            assert self.after is not None, "an existing projector must be reused, not retrained"
            return {"state_dict": {"w": torch.zeros(2)}, "loss_before": 0.858, "loss_after": self.after,
                    "steps": 10, "seconds": 0.1}

    (tmp_path / "s.yaml").write_text("granularity: layer\nlevels: [0.0, 0.5]\nbudget: {target: 0.25}\n")
    problem = PruningProblem(config_from_dict({"space": str(tmp_path / "s.yaml")}, tmp_path / "e.yaml"))
    state = RoundState(0, {"space": "spaces/round-0.yaml", "projector": None, "projector_version": 0})
    top = [{"layer.0": 0.5}]
    assert problem._next_projector(state, top, LocalContext(tmp_path, Worker(1.019))) == {}
    meta = json.loads((tmp_path / "projector" / "projector-1.json").read_text())
    assert meta["adopted"] is False and not (tmp_path / "projector" / "projector-1.safetensors").exists()
    adopted = problem._next_projector(state, top, LocalContext(tmp_path, Worker(0.7)))
    assert adopted == {"projector": "projector/projector-1.safetensors", "projector_version": 1}
    # A resume after a crash past this point finds the trained projector and reuses it.
    assert problem._next_projector(state, top, LocalContext(tmp_path, Worker(None))) == adopted


# -- with Ray ----------------------------------------------------------------------------------------------------

def _cli(args: list[str], ray_tmp: str, log: Path) -> subprocess.Popen:
    """`python -m efficientllava.cli ARGS` with a private Ray temp dir, in its own session."""
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "efficientllava.cli", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _kill_ray(marker: str) -> None:
    from rayprocs import kill_ray

    kill_ray(marker)
    shutil.rmtree(marker, ignore_errors=True)


def _check_rounds(root: Path) -> None:
    """Every round has exactly its trial count and no params were evaluated twice."""
    recs = [json.loads(p.read_text()) for p in (root / "trials").glob("*.json")]
    for r in range(ROUNDS):
        done = [x for x in recs if x["round"] == r]
        assert len(done) == TRIALS, (r, len(done))
        keys = [tuple(sorted(x["params"].items())) for x in done]
        assert len(set(keys)) == len(keys), f"round {r}: params evaluated twice"
    assert json.loads((root / "state.json").read_text())["status"] == "done"


DISK_FULL_AFTER = """
import errno, os, sys
from pathlib import Path
real = os.fsync
trials = Path(sys.argv[1]) / "trials"
def fsync(fd):  # the disk fills once round 1 has 2 records: every later fsync fails
    if len(list(trials.glob("1-*.json"))) >= 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real(fd)
os.fsync = fsync
from efficientllava.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _two_resumes(root: Path, tmps: list[str], logs: list[Path]) -> dict[str, float]:
    """Start two `resume root` at once: one runs to the end, the other exits 2 at once with one line."""
    procs = [_cli(["resume", str(root), "--no-heldout"], tmps[i], logs[i]) for i in range(2)]
    t0 = time.perf_counter()
    ends: dict[int, float] = {}
    while len(ends) < 2 and time.perf_counter() - t0 < 300:
        for i, p in enumerate(procs):
            if i not in ends and p.poll() is not None:
                ends[i] = time.perf_counter() - t0
        time.sleep(0.05)
    (rc_ok, winner), (rc_busy, loser) = sorted((p.wait(timeout=60), i) for i, p in enumerate(procs))
    text = [log.read_text() for log in logs]
    assert (rc_ok, rc_busy) == (0, 2), text
    errors = [ln for ln in text[loser].splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "is being searched by pid" in errors[0], text[loser]
    return {"winner_s": ends[winner], "loser_s": ends[loser]}


@pytest.mark.slow
def test_disk_full_mid_search_then_moved_and_resumed_twice_at_once(tmp_path):
    """A search whose disk fills in round 1 exits 2 with one line; after `mv D E`, two `resume E` at once: one
    finishes the search, the other exits 2 in under 5 s; nothing lost, rewritten or evaluated twice."""
    cfg = write_toy_config(tmp_path, space={"params": {f"x_{i}": [0, 99] for i in range(4)}, "target": 30})
    root, moved = tmp_path / "D", tmp_path / "E"
    tmps = [tempfile.mkdtemp(prefix="elf", dir="/tmp") for _ in range(3)]
    env = {**os.environ, "RAY_TMPDIR": tmps[0]}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-c", DISK_FULL_AFTER, str(root), "search", str(cfg), "--dir",
                               str(root), "--no-heldout"], capture_output=True, text=True, env=env, timeout=300)
        _kill_ray(tmps[0])
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "no space left on device" in errors[0] and f"efficientllava resume {root}" in errors[0], errors
        before = {p.name: p.read_bytes() for p in (root / "trials").glob("*.json")}
        assert len([n for n in before if n.startswith("1-")]) >= 2
        os.rename(root, moved)
        times = _two_resumes(moved, tmps[1:], [tmp_path / "r0.log", tmp_path / "r1.log"])
        print(f"\nconcurrent resumes: winner exit 0 after {times['winner_s']:.1f} s, "
              f"loser exit 2 after {times['loser_s']:.1f} s")
        assert times["loser_s"] < 5, times
    finally:
        for t in tmps:
            _kill_ray(t)
    for name, data in before.items():
        assert (moved / "trials" / name).read_bytes() == data
    _check_rounds(moved)
    assert yaml.safe_load((moved / "config.yaml").read_text())["space"] == "space.yaml"


def test_a_refusal_names_the_holder_that_has_just_taken_the_lock(tmp_path):
    """A holder writes its JSON just after its flock: the refused process waits for it instead of saying
    "another process" (or naming the previous, released holder)."""
    import threading

    from efficientllava.experiment_lock import LOCK_FILE, _live_holder

    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "h", "released": True}))
    later = threading.Timer(0.2, lambda: lock.write_text(json.dumps({"pid": 4242, "host": "h"})))
    later.start()
    try:
        assert _live_holder(lock)["pid"] == 4242
    finally:
        later.cancel()
    lock.write_text("")
    assert _live_holder(lock, wait_s=0.1) is None


def test_a_config_cut_short_that_still_parses_is_refused(tmp_path):
    """Most keys have defaults, so half a config.yaml can be a valid config: its digest line tells it apart."""
    from efficientllava.config import config_from_dict
    from efficientllava.errors import DamagedFileError
    from efficientllava.experiment import create_experiment

    cfg = config_from_dict({"name": "cut", "space": "search_spaces/tiny.yaml"}, Path(__file__).parents[1] / "x.yaml")
    exp = create_experiment(cfg, tmp_path / "exp")
    assert exp.load_config() == open_experiment(exp.root).load_config()
    text = exp.config_path.read_text()
    lines = text.splitlines(keepends=True)
    cut = next(i for i in range(len(lines) - 1, 0, -1) if not lines[i].startswith(" "))  # ends before a section
    exp.config_path.write_text("".join(lines[:cut]))
    config_from_dict(yaml.safe_load("".join(lines[1:cut])), "cut.yaml", resolve_space=False)  # valid on its own
    with pytest.raises(DamagedFileError, match="sha256 does not match.*delete the first line"):
        exp.load_config()
    exp.config_path.write_text("".join(lines[1:cut]))  # the person accepts the edit: no digest, no check
    assert exp.load_config().name == "cut"
