"""Fault injection for experiment directories (tests and `benchmarks/faults_table.py`), without Ray.

`build_experiment` writes a toy experiment directory as the driver leaves it (finished, or killed in
the middle of its last round) in this process: the same files, written by the same functions
(create_experiment, the problem's initial_state / after_round, trial_record, the journal study,
finalize), with trials asked from a seeded random sampler instead of Tune. `run_case` damages one
file (delete, truncate to half, garble), runs one CLI command in-process and judges the outcome:
either a correct recovery (exit 0, and for `resume` the directory prepared up to where Ray would
start) or exactly one `error:` line naming the file (exit 2), and in both cases no other trial
record changed and none added. For `resume`, `init_ray` is replaced by a stop: everything a resume
does before Ray (lock, checks, journal/state rebuild) runs for real; the study is then reconciled
as the driver would, and must hold every record with nothing left to evaluate twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from efficientllava.atomic import write_json_atomic
from efficientllava.config import load_config
from efficientllava.experiment import STATUS_DONE, STATUS_RUNNING, create_experiment, open_experiment
from efficientllava.search.api import METRIC, LocalContext, build_problem

TOY = "efficientllava.testing.toy:QuadraticProblem"
ROUNDS, TRIALS = 2, 4
SPACE = {"params": {"x_0": [0, 9], "x_1": [0, 9], "x_2": [0, 9]}, "target": 3}

# (file relative to the experiment directory, which experiment holds it)
FILES = ("config.yaml", "state.json", "study.journal", "trials/0-1.json", "best_policy.json", "heldout.json",
         "trials.parquet", "space.yaml", "spaces/round-1.yaml", "rounds/round-1/state.json", ".driver.lock")
DAMAGES = ("delete", "truncate", "garble")
COMMANDS = ("trials", "report", "resume")


class RayWouldStart(Exception):
    """Raised in place of `init_ray`: the command got as far as starting Ray."""


def write_toy_config(folder: Path, rounds: int = ROUNDS, trials: int = TRIALS, space: dict | None = None,
                     **search: Any) -> Path:
    """A toy experiment YAML (and its space) in `folder`; returns the YAML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "space.yaml").write_text(yaml.safe_dump(space or SPACE))
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "faults", "problem": TOY, "space": "space.yaml",
                                    "search": {"rounds": rounds, "trials_per_round": trials, "max_concurrent": 2,
                                               "n_startup_trials": trials * rounds, **search}}))
    return path


def build_experiment(folder: Path, *, interrupted: bool = False, seed: int = 0) -> Path:
    """A toy experiment directory at `folder/D`: finished (2 rounds x 4 trials, best_policy.json, trials.parquet,
    a held-out file), or killed in round 1 with 2 trials recorded and a third RUNNING without a record."""
    from optuna.trial import TrialState

    from efficientllava.search.driver import finalize, search_objectives
    from efficientllava.search.study import ATTR_NUMBER, distributions, open_study
    from efficientllava.trials import load_trials, trial_record, write_trials_parquet

    cfg = load_config(write_toy_config(folder))
    exp = create_experiment(cfg, folder / "D")
    cfg = exp.load_config()
    problem: Any = build_problem(cfg)
    ctx = LocalContext(exp.root, problem)
    objectives = search_objectives(problem, cfg.search.sampler)
    history: list = []
    state = problem.initial_state(ctx)
    exp.write_state(STATUS_RUNNING, state, history)
    for r in range(ROUNDS):
        last = r == ROUNDS - 1
        problem.enter_round(state, problem.round_inputs(state, ctx))
        study = open_study(exp, r, objectives, sampler=optuna.samplers.RandomSampler(seed + r))
        dists: dict[str, Any] = dict(distributions(problem.space(state, ctx)))
        for number in range(TRIALS):
            trial = study.ask(dists)
            trial.set_user_attr(ATTR_NUMBER, number)
            if interrupted and last and number == 2:
                break  # killed mid evaluation: RUNNING, no record
            now = time.time()
            result = problem.evaluate(trial.params, state)
            write_json_atomic(exp.trial_path(r, number), trial_record(
                state=state, number=number, trial_id=f"fake{r}{number}", params=trial.params, result=result,
                error=None, started=now, finished=now, eval_s=0.0, retry_of=None))
            study.tell(trial, result[METRIC])
        if interrupted and last:
            assert any(t.state == TrialState.RUNNING for t in study.get_trials())
            break
        write_trials_parquet(exp.root)
        if not last:
            nxt = problem.after_round(state, load_trials(exp.root), ctx)
            history.append(state)
            exp.write_state(STATUS_RUNNING, nxt, history)
            state = nxt
    if not interrupted:
        exp.write_state(STATUS_DONE, state, history + [state])
        finalize(exp, objectives)
        best = json.loads(exp.best_policy_path.read_text())
        write_json_atomic(exp.heldout_path, {  # the toy has no held-out set: a stand-in the readers check
            "dense": {"accuracy": 1.0}, "best": {k: best[k] for k in ("round", "number", "objective")}})
    (exp.root / ".driver.lock").write_text(json.dumps({"host": "old", "pid": 1, "started_at": 0, "released": True}))
    return exp.root


def damage(path: Path, how: str) -> None:
    """Delete `path`, cut it to half its bytes, or garble it (bytes that parse as neither JSON nor YAML)."""
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garble":
        if path.name == "study.journal":  # a bad line in the middle (Optuna fails on it, not just skips it)
            lines = path.read_bytes().splitlines(keepends=True)
            lines[len(lines) // 2] = b'{"op_code": 5, "worker_id": \n'
            path.write_bytes(b"".join(lines))
        else:
            path.write_bytes(b'{"oops": [\x00\xff')
    else:
        raise ValueError(how)


@dataclass(frozen=True)
class Outcome:
    """What one command did to a damaged directory."""

    file: str
    damage: str
    command: str
    rc: int | str  # exit code, or "ray" when `resume` got as far as starting Ray
    message: str  # the error line, or the recovery lines (warnings), or ""
    ok: bool  # a one-line error naming the file, or a correct recovery; nothing lost, rewritten or re-run
    why: str = ""  # what failed the judgement


@contextlib.contextmanager
def _no_ray() -> Iterator[None]:
    """Replace `init_ray` by RayWouldStart for the block."""
    import efficientllava.search.runner as runner

    def stop() -> None:
        raise RayWouldStart

    saved = runner.init_ray
    runner.init_ray = stop  # type: ignore[assignment]
    try:
        yield
    finally:
        runner.init_ray = saved  # type: ignore[assignment]


def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """`efficientllava ARGV` in this process (Ray replaced by a stop); (exit code or "ray", stderr)."""
    from efficientllava.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), _no_ray():
        try:
            rc: int | str = main(argv)
        except RayWouldStart:
            rc = "ray"
        except Exception:  # noqa: BLE001 (an escaped exception is a finding: the CLI would print a traceback)
            import traceback

            traceback.print_exc(file=err)
            rc = 1
    return rc, err.getvalue()


def _check_study(root: Path, records: dict[str, bytes], interrupted: bool) -> str:
    """After a resume got to Ray: the study holds every record and reconciles to the right remaining count."""
    from efficientllava.search.recovery import journal_damage
    from efficientllava.search.study import reconcile_round
    from efficientllava.trials import read_records

    exp = open_experiment(root)
    recs = read_records(root)
    why = journal_damage(exp, recs)
    if why:
        return f"the journal still {why}"
    state = exp.read_state()
    for r in range(int(state["round"]) + 1):
        n_records = sum(1 for name in records if name.startswith(f"{r}-"))
        progress = reconcile_round(exp, r, TRIALS, retry_errors=True)
        want_done = TRIALS if not (interrupted and r == ROUNDS - 1) else n_records
        if progress.done != want_done or progress.remaining != TRIALS - want_done:
            return f"round {r}: {progress.done} done / {progress.remaining} to run, expected {want_done} done"
    if state["round"] != ROUNDS - 1:
        return f"state.json says round {state['round']}, expected {ROUNDS - 1}"
    return ""


def run_case(base: Path, work: Path, file: str, how: str, command: str, *, interrupted: bool) -> Outcome:
    """Copy the experiment `base` to `work`, damage `file`, run `command`, judge the outcome."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(base, work, symlinks=True)
    target = work / file
    if not target.exists():
        return Outcome(file, how, command, "-", "(no such file in this experiment)", True)
    damage(target, how)
    before = {p.name: p.read_bytes() for p in (work / "trials").glob("*.json") if p.is_file()}
    argv = {"trials": ["trials", str(work)], "report": ["report", str(work)],
            "resume": ["resume", str(work), "--no-heldout"]}[command]
    rc, err = run_cli(argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    message = errors[0] if errors else " | ".join(ln.removeprefix("[efficientllava] ") for ln in lines
                                                  if ln.startswith("[efficientllava]") and not ln.startswith(
                                                      ("[efficientllava] resuming ", "[efficientllava] report: ",
                                                       "[efficientllava] trials: efficientllava")))
    why = ""
    if "Traceback" in err:
        why = "a traceback"
    elif rc == 2:
        if len(errors) != 1 or len(lines) != 1:
            why = f"{len(lines)} stderr lines, {len(errors)} error lines"
        elif Path(file).name not in errors[0] and str(work) not in errors[0]:
            why = "the error does not name the file"
    elif rc not in (0, "ray"):
        why = f"exit {rc}"
    after = {p.name: p.read_bytes() for p in (work / "trials").glob("*.json") if p.is_file()}
    if not why:
        changed = [n for n in before if after.get(n) != before[n]]
        added = sorted(set(after) - set(before))
        if changed or added:
            why = f"trial records changed {changed} or added {added}"
    if not why and rc == "ray":
        why = _check_study(work, after, interrupted)
    return Outcome(file, how, command, rc, message[:300], not why, why)


def fault_table(folder: Path, progress: Callable[[Outcome], None] | None = None,
                commands: tuple[str, ...] = COMMANDS) -> list[Outcome]:
    """Every (experiment, file, damage, command) case; experiments built once under `folder`."""
    out = []
    for kind in ("finished", "interrupted"):
        base = build_experiment(folder / kind, interrupted=kind == "interrupted")
        for file in FILES:
            for how in DAMAGES:
                for command in commands:
                    o = run_case(base, folder / "work", file, how, command, interrupted=kind == "interrupted")
                    o = Outcome(f"{kind}:{o.file}", o.damage, o.command, o.rc, o.message, o.ok, o.why)
                    out.append(o)
                    if progress is not None:
                        progress(o)
    return out


def format_table(rows: list[Outcome]) -> str:
    """The table as fixed-width text: experiment:file | damage | command | exit | outcome."""
    head = f"{'experiment:file':38s} {'damage':8s} {'command':7s} {'exit':4s} {'ok':3s} outcome"
    lines = [head, "-" * len(head)]
    for o in rows:
        outcome = o.message or ("recovered/unaffected" if o.ok else "")
        if o.why:
            outcome = f"FAIL ({o.why}): {outcome}"
        lines.append(f"{o.file:38s} {o.damage:8s} {o.command:7s} {o.rc!s:4s} {'yes' if o.ok else 'NO':3s} {outcome}")
    return "\n".join(lines)
