"""The driver: the round loop of one search, in the process that runs `efficientllava search`/`resume`.

Per search it starts the evaluation workers (`efficientllava.search.workers`) once; per round it
sends the round's inputs to them, runs a Ray Tune `Tuner` whose trials forward to the workers, and
writes each trial's record from a Tune callback in this process (the experiment directory lives
only here). Between rounds the problem's `after_round` runs here, with its heavy work on a worker.

Resume, and why it does not use `Tuner.restore`
-----------------------------------------------
Every round's Optuna study (in the experiment's journal file) and the trial records are what a
resume trusts; Tune's experiment state is not. The record of a trial is written in the callback's
`on_trial_result`, which Tune calls before it tells the searcher (`TuneController._process_trial_result`
runs the callbacks, then the STOP decision reaches `stop_trial` -> `search_alg.on_trial_complete`),
so a kill can leave a record that Optuna has not heard of, never the reverse. Evaluation errors
come back as results too (status ERROR); only a trial whose forwarder or worker died goes through
Tune's failure path, which tells the searcher first and the callback (`on_trial_error`) second:
a kill in between leaves a FAIL without a record, which reconciliation re-runs once.

A round, fresh or interrupted, is run as: `reconcile_round` (tell the study results that were
recorded but not told, fail + re-enqueue trials interrupted mid-evaluation, on resume re-enqueue
errored trials once), then a new Tuner on the same study for exactly the remaining count, repeated
until the round has `trials_per_round` finished trials. The sampler sees every past trial because
the study is shared.

`Tuner.restore(path, trainable, resume_errored=True)` was not used because, with OptunaSearch, it
cannot lose/repeat nothing provably (read from ray 2.60's tune/search/optuna/optuna_search.py and
tune_controller.py):
- the searcher (its `_ot_trials` map: Tune trial id -> Optuna trial) is pickled on the experiment
  checkpoint cadence while trial states are saved separately; a trial created after the last
  searcher snapshot is restarted by Tune, and its completion hits `self._ot_trials[trial_id]` ->
  KeyError, or is told to an Optuna trial that reconciliation already failed, which Optuna refuses
  (`on_trial_complete` only logs that warning): the result is lost from the study;
- a trial that finished (recorded) after the last Tune checkpoint is RUNNING in the restored
  state and would be evaluated again;
- `resume_errored` re-runs an errored trial under the same, already FAILed, Optuna trial.
The journal study has none of these gaps: every ask/tell is appended to the file at once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from efficientllava.atomic import write_json_atomic
from efficientllava.config import ExperimentConfig
from efficientllava.errors import EfficientLLaVAError
from efficientllava.experiment import STATUS_DONE, STATUS_RUNNING, ExperimentDir, open_experiment
from efficientllava.heldout import heldout_lines
from efficientllava.log import get_logger
from efficientllava.search.api import METRIC, Objective, RoundState, SearchProblem, TrialStatus, build_problem
from efficientllava.search.recovery import heal_experiment
from efficientllava.search.samplers import get_sampler
from efficientllava.search.session import Batch, TuneSession
from efficientllava.search.study import (
    RoundProgress,
    enqueue_seeds,
    make_searcher,
    open_study,
    reconcile_round,
    repair_journal,
)
from efficientllava.search.trainable import split_config
from efficientllava.search.workers import Workers
from efficientllava.trials import (
    best_record,
    load_trials,
    read_records,
    trial_record,
    write_best_policy,
    write_trials_parquet,
)

log = get_logger(__name__)
MAX_ATTEMPTS = 3  # Tuner runs per round start; more than one only if trials die without a result
PROGRESS_EVERY_S = 10.0  # at most one progress line per this many seconds
# Trials in flight beyond one per worker: each waits in the pool for a free worker, so a worker starts its
# next evaluation as soon as it is free instead of after Tune's round trip (record, tell, ask, forward).
# The sampler sees one more pending trial (TPE's constant liar covers it).
QUEUE_AHEAD = 1

class EngineContext:
    """The `DriverContext` the engine gives problems: the experiment directory and worker calls."""

    def __init__(self, root: Path, workers: Workers | None) -> None:
        self._root, self._workers = root, workers

    @property
    def root(self) -> Path:
        """The experiment directory."""
        return self._root

    def call(self, method: str, *args: Any) -> Any:
        """`problem.<method>(*args)` on a worker."""
        if self._workers is None:
            raise RuntimeError("no workers were started for this driver run")
        return self._workers.call(method, *args)


def search_objectives(problem: SearchProblem, sampler: str) -> tuple[Objective, ...]:
    """The study's objectives: all the problem's for a multi-objective sampler, else its first."""
    objectives = tuple(problem.objectives)
    if not objectives or objectives[0].name != METRIC or objectives[0].mode != "max":
        raise EfficientLLaVAError(f"the problem's first objective must be ({METRIC!r}, 'max'), got {objectives}")
    if get_sampler(sampler).multi_objective:
        if len(objectives) < 2:
            raise EfficientLLaVAError(f"search.sampler={sampler!r} is multi-objective but the problem has "
                                      f"one objective; choose a single-objective sampler")
        return objectives
    return objectives[:1]


class TrialRecorder:
    """Writes each trial's record of one batch in the driver, before the searcher hears of the outcome."""

    def __init__(self, exp: ExperimentDir, state: RoundState, progress: ProgressLog) -> None:
        self.exp, self.state, self.progress = exp, state, progress

    def _write(self, rec: dict[str, Any]) -> None:
        write_json_atomic(self.exp.trial_path(self.state.round, rec["number"]), rec)
        self.progress.add(rec)

    def on_result(self, trial: Any, result: dict[str, Any]) -> None:
        """Record a finished evaluation (completed or errored)."""
        outcome, tags = result["outcome"], result["tags"]
        rec = trial_record(state=self.state, number=tags["number"], trial_id=trial.trial_id,
                           params=result["params"], result=outcome["result"], error=outcome["error"],
                           started=outcome["started_at"], finished=outcome["finished_at"],
                           wall_s=outcome["returned_at"] - outcome["submitted_at"],
                           eval_s=outcome["eval_s"], retry_of=tags["retry_of"], worker=outcome["worker"],
                           traceback=outcome.get("traceback"), seed=tags["seed"])
        rec["forwarder_started_at"] = outcome.get("forwarder_started_at")  # Tune's trial actor start (overhead)
        self._write(rec)

    def on_error(self, trial: Any) -> None:
        """Record a trial whose forwarder or worker died (no outcome came back)."""
        params, tags = split_config(trial.config)
        text = str(trial.get_error() or "the trial's actor died")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        now = time.time()
        rec = trial_record(state=self.state, number=tags["number"], trial_id=trial.trial_id, params=params,
                           result=None, error=(lines[-1] if lines else text)[:500], started=now, finished=now,
                           wall_s=0.0, eval_s=0.0, retry_of=tags["retry_of"], worker=None, traceback=text, seed=tags["seed"])
        self._write(rec)


class ProgressLog:
    """One progress line at most every PROGRESS_EVERY_S: trials done / total, best so far, elapsed, ETA."""

    def __init__(self, r: int, total: int, done: int, best: float, every_s: float = PROGRESS_EVERY_S) -> None:
        self.r, self.total, self.done, self.best = r, total, done, best
        self.every_s = every_s
        self.started = self.last = time.time()
        self.new = 0

    def add(self, rec: dict[str, Any]) -> None:
        """Count one finished trial; log a line when the last one is old enough."""
        self.done += 1
        self.new += 1
        value = rec.get("objective")
        if rec["status"] == TrialStatus.COMPLETE.value and isinstance(value, (int, float)):
            self.best = max(self.best, float(value))
        now = time.time()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            log.info(self.line(now))

    def line(self, now: float) -> str:
        """The progress line."""
        elapsed = now - self.started
        eta = elapsed / self.new * max(0, self.total - self.done) if self.new else math.nan
        best = f"{self.best:.4g}" if math.isfinite(self.best) else "-"
        return (f"round {self.r}: {self.done}/{self.total} trials, best {METRIC} {best}, "
                f"{elapsed:.0f} s elapsed, ETA {eta:.0f} s")


def open_session(exp: ExperimentDir, cfg: ExperimentConfig, workers: Workers,
                 objectives: tuple[Objective, ...]) -> TuneSession:
    """The search's Ray Tune session: `max_concurrent + QUEUE_AHEAD` forwarders to the workers' pool."""
    return TuneSession(exp, exp.tune_storage(cfg), workers.pool, objectives,
                       slots=cfg.search.max_concurrent + QUEUE_AHEAD)


def run_round(exp: ExperimentDir, cfg: ExperimentConfig, state: RoundState, problem: SearchProblem,
              ctx: EngineContext, workers: Workers, *, resume: bool, session: TuneSession | None = None) -> RoundProgress:
    """Run round `state.round` until it has `trials_per_round` finished trials; returns its progress.

    The trials run in `session` (the driver's, shared by every round); without one, in a session of their own.
    """
    objectives = search_objectives(problem, cfg.search.sampler)
    if session is None:
        return open_session(exp, cfg, workers, objectives).run(
            lambda s: run_round(exp, cfg, state, problem, ctx, workers, resume=resume, session=s))
    r, n = state.round, cfg.search.trials_per_round
    space = problem.space(state, ctx)
    seeds = problem.seed_points(state, ctx)
    for name, point in seeds.items():
        if not space.contains(point):
            raise EfficientLLaVAError(f"round {r}: seed point {name!r} is not in the round's space: {dict(point)}")
    log.debug("round %d: reconciling", r)
    progress = reconcile_round(exp, r, n, retry_errors=resume, objectives=objectives)
    added = enqueue_seeds(open_study(exp, r, objectives), seeds) if progress.remaining else []
    if added:
        log.debug("round %d: seed points first: %s", r, ", ".join(added))
    if resume and (progress.done or progress.interrupted or progress.retried_errors or progress.told):
        log.info(f"round {r}: resuming with {progress.done} finished trials; {len(progress.told)} recorded results "
                 f"told to the study, {len(progress.interrupted)} interrupted and {len(progress.retried_errors)} "
                 f"errored trials re-enqueued; {progress.remaining} to run")
    best = max((rec["objective"] for rec in read_records(exp.root) if rec["round"] == r
                and rec["status"] == TrialStatus.COMPLETE.value and rec["objective"] is not None), default=-math.inf)
    for _ in range(MAX_ATTEMPTS):
        if progress.remaining == 0:
            break
        status = workers.status()
        if not status["alive"]:
            raise EfficientLLaVAError(f"round {r}: every evaluation worker died ({status['dead']}); "
                                      f"fix the cause and run `efficientllava resume {exp.root}`")
        progress_log = ProgressLog(r, n, progress.done, best)
        recorder = TrialRecorder(exp, state, progress_log)
        log.debug("round %d: a batch of %d trials", r, progress.remaining)
        searcher = make_searcher(exp, r, space, objectives, cfg.search)
        session.run_batch(Batch(r, searcher, progress.remaining, recorder.on_result, recorder.on_error))
        best = progress_log.best
        progress = reconcile_round(exp, r, n, retry_errors=False, objectives=objectives)
        log.debug("round %d: reconciled", r)
    if progress.remaining:
        log.warning(f"round {r} ends with {progress.done}/{n} trials: {MAX_ATTEMPTS} batches lost trials "
                    "without a result (workers died?); see the errors above")
    return progress


def round_summary(trials: pd.DataFrame, r: int, seconds: float) -> str:
    """One line: best objective of round `r` (with accuracy / kept fraction when reported), #errored."""
    t = trials[trials["round"] == r]
    errored = int((t["status"] == TrialStatus.ERROR.value).sum())
    ok = t[(t["status"] == TrialStatus.COMPLETE.value) & t[METRIC].notna()]
    head = f"round {r}: {len(t)} trials ({errored} errored) in {seconds:.1f} s"
    if ok.empty:
        return head + "; no successful trial"
    best = ok.loc[ok[METRIC].idxmax()]
    # Unlabelled data: the few-shot "accuracy" is agreement with the dense model's answers; say so.
    agree = "labelled" in t and best["labelled"] is not None and not bool(best["labelled"])
    extra = "".join(f", {'agreement with dense' if k == 'accuracy' and agree else k} {best[k]:.4g}"
                    for k in ("accuracy", "kept_fraction") if k in t and pd.notna(best[k]))
    mean_eval = ok["eval_s"].mean()
    return head + f"; best {METRIC} {best[METRIC]:.4g} (trial {r}-{int(best['number'])}{extra}); mean eval {mean_eval:.2f} s"


def _fail_if_nothing_succeeded(exp: ExperimentDir, trials: pd.DataFrame, r: int) -> None:
    """Stop the search when every trial of a round failed: the next round would have nothing to build on."""
    t = trials[trials["round"] == r]
    if (t["status"] == TrialStatus.COMPLETE.value).any():
        return
    if len(t) == 0:
        raise EfficientLLaVAError(f"round {r}: no trial finished (workers died?); see the errors above")
    first = t.iloc[0]
    raise EfficientLLaVAError(
        f"round {r}: all {len(t)} trials failed; first error (trial {r}-{first['number']}): {first['error']}; "
        f"see {exp.trial_path(r, int(first['number']))}, fix the cause and run `efficientllava resume {exp.root}`"
    )


def finalize(exp: ExperimentDir, objectives: Sequence[Objective]) -> None:
    """Write the all-rounds outputs: trials.parquet and best_policy.json."""
    write_trials_parquet(exp.root)
    best = write_best_policy(exp.root, objectives)
    log.info(f"done: {exp.trials_parquet}" + (f", {best}" if best else " (no successful trial)"))


def log_heldout(heldout: dict[str, Any]) -> None:
    """One line per compared policy (its figure by task kind, mean sparsity, FLOPs speed-up when present)."""
    for line in heldout_lines(heldout):
        log.info(line)


class SearchDriver:
    """The round loop of one experiment, run in the calling process."""

    def __init__(self, experiment_root: str | Path) -> None:
        self.exp = open_experiment(experiment_root)
        self.cfg = self.exp.load_config()

    def _workers(self) -> Workers:
        """The search's workers (started when entered)."""
        res = self.cfg.resources
        return Workers(self.cfg, self.exp.name, self.cfg.search.max_concurrent, res.cpu, res.gpu)

    def prepare(self) -> list[str]:
        """Before workers start (and before Ray, under the caller's lock): drop a torn journal line and rebuild a
        damaged or missing journal / state.json from the records; returns the repairs made (each logged)."""
        exp = self.exp
        problem = build_problem(self.cfg)
        repairs = []
        if repair_journal(exp):
            repairs.append(f"dropped a partly written last line from {exp.journal_path}")
            log.warning(repairs[-1])
        return repairs + heal_experiment(exp, problem, search_objectives(problem, self.cfg.search.sampler),
                                         EngineContext(exp.root, None))

    def run(self, heldout: bool = True, *, locked: bool = False) -> Path:
        """Run (or continue) every remaining round, then the held-out check; returns the experiment directory.

        Takes the directory's driver lock unless the caller holds it (`locked`, as the runner does
        before Ray starts). The directory is healed first (`efficientllava.search.recovery`).
        """
        exp = self.exp
        exp.check_format()
        with contextlib.nullcontext() if locked else exp.driver_lock():
            self.prepare()  # a no-op when the runner already prepared the directory
            problem = build_problem(self.cfg)
            objectives = search_objectives(problem, self.cfg.search.sampler)
            saved = exp.read_state()
            if saved["status"] == STATUS_DONE:
                finalize(exp, objectives)
                if heldout:
                    with self._workers() as workers:
                        self._heldout(problem, EngineContext(exp.root, workers))
                return exp.root  # nothing left to search
            started = time.time()
            run_file = exp.rounds_dir / f"run-{started:.3f}.json"
            with self._workers() as workers:
                ctx = EngineContext(exp.root, workers)

                def body(session: TuneSession) -> float:
                    """The rounds, then (while Tune winds down) the outputs and the held-out check."""
                    self._rounds(problem, ctx, workers, session, resume=saved["status"] == STATUS_RUNNING)
                    session.finish()
                    finished = time.time()
                    finalize(exp, objectives)
                    if heldout:
                        self._heldout(problem, ctx)
                    return finished

                # One Tune session for every round: its forwarders start while the workers load, and live on.
                finished = open_session(exp, self.cfg, workers, objectives).run(body)
                # Whole-run timing: from the driver's start (workers started, every round) to the last round's end.
                write_json_atomic(run_file, {"started_at": started, "finished_at": finished,
                                             "heldout_s": time.time() - finished if heldout else None,
                                             "max_concurrent": self.cfg.search.max_concurrent,
                                             "workers": workers.infos()})
        return exp.root

    def _rounds(self, problem: SearchProblem, ctx: EngineContext, workers: Workers, session: TuneSession, *,
                resume: bool) -> None:
        """The round loop (from the current round in state.json, or round 0)."""
        exp, cfg = self.exp, self.cfg
        history = exp.history()
        state = exp.round_state()
        if state is None:
            state = problem.initial_state(ctx)
            exp.write_state(STATUS_RUNNING, state, history)
        while True:
            t0 = time.time()
            entered = workers.enter_round(state, problem.round_inputs(state, ctx))
            log.debug("round %d entered on %d workers in %s", state.round, len(entered),
                      ", ".join(f"{s:.1f}s" for s in entered.values()))
            progress = run_round(exp, cfg, state, problem, ctx, workers, resume=resume, session=session)
            t1 = time.time()
            resume = False
            trials = load_trials(exp.root)
            log.info(round_summary(trials, state.round, t1 - t0))
            write_json_atomic(exp.round_dir(state.round) / f"timing-{int(t0)}.json", {
                "round": state.round, "started_at": t0, "finished_at": t1, "seconds": t1 - t0,
                "done": progress.done, "max_concurrent": cfg.search.max_concurrent,
            })
            write_json_atomic(exp.round_dir(state.round) / f"workers-{int(t0)}.json", workers.infos())
            write_trials_parquet(exp.root)
            _fail_if_nothing_succeeded(exp, trials, state.round)
            if state.round + 1 >= cfg.search.rounds:
                break
            nxt = problem.after_round(state, trials, ctx)
            if nxt.round != state.round + 1:
                raise RuntimeError(f"after_round returned round {nxt.round}, expected {state.round + 1}")
            history.append(state)
            exp.write_state(STATUS_RUNNING, nxt, history)
            state = nxt
        exp.write_state(STATUS_DONE, state, history + [state])

    def heldout(self, *, locked: bool = False) -> Path:
        """Only the held-out check (workers started for it); returns the experiment directory."""
        self.exp.check_format()
        with contextlib.nullcontext() if locked else self.exp.driver_lock(), self._workers() as workers:
            self._heldout(build_problem(self.cfg), EngineContext(self.exp.root, workers))
        return self.exp.root

    def _heldout(self, problem: SearchProblem, ctx: EngineContext) -> None:
        """The problem's held-out comparison of the best trial, written to heldout.json."""
        best = best_record(self.exp.root)
        if best is None:
            return
        result = problem.heldout(self.exp.history(), best, ctx)
        if result is None:
            return
        out = {k: dict(v) for k, v in result.items()}
        write_json_atomic(self.exp.heldout_path, out)
        log_heldout(out)
