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
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune
from ray.tune.error import TuneError

from efficientllava.atomic import write_json_atomic
from efficientllava.config import ExperimentConfig
from efficientllava.errors import DiskFullError, EfficientLLaVAError
from efficientllava.experiment import STATUS_DONE, STATUS_RUNNING, ExperimentDir, open_experiment
from efficientllava.heldout import heldout_lines
from efficientllava.log import get_logger
from efficientllava.search.api import METRIC, Objective, RoundState, SearchProblem, TrialStatus, build_problem
from efficientllava.search.recovery import heal_experiment
from efficientllava.search.samplers import get_sampler
from efficientllava.search.study import (
    RoundProgress,
    enqueue_seeds,
    make_searcher,
    open_study,
    reconcile_round,
    repair_journal,
)
from efficientllava.search.trainable import make_trainable
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

# Keep Tune's per-trial bookkeeping light and quiet: no CSV/JSON/TensorBoard result loggers per trial
# (the records are the record), no status tables (the progress line replaces them), and a SIGINT
# that reaches our code as KeyboardInterrupt instead of Tune's graceful stop (which would let the
# round loop go on).
TUNE_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0",
            "TUNE_DISABLE_SIGINT_HANDLER": "1", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "60",
            # Tune's experiment checkpoints (searcher pickled with the whole study) are never read back
            # (resume trusts the journal and the records): rarely, not on Tune's "auto" cadence.
            "TUNE_GLOBAL_CHECKPOINT_S": "300"}


def _trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default embeds every param)."""
    return str(trial.trial_id)


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


class TrialRecorder(tune.Callback):
    """Writes each trial's record in the driver, before the searcher hears of the outcome."""

    def __init__(self, exp: ExperimentDir, state: RoundState, progress: ProgressLog) -> None:
        self.exp, self.state, self.progress = exp, state, progress
        self.error: EfficientLLaVAError | None = None  # e.g. disk full: Tune wraps it in a TuneError traceback

    def _write(self, rec: dict[str, Any]) -> None:
        """Write a record; a user-facing error is kept for run_round to raise as itself, then stops Tune."""
        try:
            write_json_atomic(self.exp.trial_path(self.state.round, rec["number"]), rec)
        except EfficientLLaVAError as exc:
            self.error = exc
            raise

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
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
        self.progress.add(rec)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Record a trial whose forwarder or worker died (no outcome came back)."""
        from efficientllava.search.trainable import split_config

        params, tags = split_config(trial.config)
        text = str(trial.get_error() or "the trial's actor died")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        now = time.time()
        rec = trial_record(state=self.state, number=tags["number"], trial_id=trial.trial_id, params=params,
                           result=None, error=(lines[-1] if lines else text)[:500], started=now, finished=now,
                           wall_s=0.0, eval_s=0.0, retry_of=tags["retry_of"], worker=None, traceback=text, seed=tags["seed"])
        self._write(rec)
        self.progress.add(rec)


class ProgressLog(tune.Callback):
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


def run_round(exp: ExperimentDir, cfg: ExperimentConfig, state: RoundState, problem: SearchProblem,
              ctx: EngineContext, workers: Workers, *, resume: bool) -> RoundProgress:
    """Run round `state.round` until it has `trials_per_round` finished trials; returns its progress."""
    for k, v in TUNE_ENV.items():
        os.environ.setdefault(k, v)
    # Tune's ResultGrid looks for the per-trial result files we turned off; its warning is noise here.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    r, n = state.round, cfg.search.trials_per_round
    objectives = search_objectives(problem, cfg.search.sampler)
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
    for attempt in range(MAX_ATTEMPTS):
        if progress.remaining == 0:
            break
        status = workers.status()
        if not status["alive"]:
            raise EfficientLLaVAError(f"round {r}: every evaluation worker died ({status['dead']}); "
                                      f"fix the cause and run `efficientllava resume {exp.root}`")
        progress_log = ProgressLog(r, n, progress.done, best)
        recorder = TrialRecorder(exp, state, progress_log)
        log.debug("round %d: starting a Tuner for %d trials", r, progress.remaining)
        tuner = tune.Tuner(
            make_trainable(workers.pool, r, objectives, slots=cfg.search.max_concurrent + QUEUE_AHEAD),
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(exp, r, space, objectives, cfg.search, queue_ahead=QUEUE_AHEAD),
                num_samples=progress.remaining,
                reuse_actors=True,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{attempt}",
                storage_path=exp.tune_storage(r, cfg),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=0, checkpoint_at_end=False),
                verbose=0,
                callbacks=[recorder],
                log_to_file=False,
            ),
        )
        try:
            tuner.fit()
        except TuneError as exc:
            if recorder.error is not None:
                raise recorder.error from None
            if "No space left on device" in str(exc):  # one of Tune's own files
                raise DiskFullError(f"{exp.tune_storage(r, cfg)}: no space left on device (Ray Tune's round files); "
                                    f"free space and run `efficientllava resume {exp.root}`") from None
            raise
        log.debug("round %d: Tuner.fit returned", r)
        best = progress_log.best
        progress = reconcile_round(exp, r, n, retry_errors=False, objectives=objectives)
        log.debug("round %d: reconciled", r)
    if progress.remaining:
        log.warning(f"round {r} ends with {progress.done}/{n} trials: {MAX_ATTEMPTS} Tuner runs lost trials "
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
                self._rounds(problem, ctx, workers, resume=saved["status"] == STATUS_RUNNING)
                finished = time.time()
                finalize(exp, objectives)
                if heldout:
                    self._heldout(problem, ctx)
                # Whole-run timing: from the driver's start (workers started, every round) to the last round's end.
                write_json_atomic(run_file, {"started_at": started, "finished_at": finished,
                                             "heldout_s": time.time() - finished if heldout else None,
                                             "max_concurrent": self.cfg.search.max_concurrent,
                                             "workers": workers.infos()})
        return exp.root

    def _rounds(self, problem: SearchProblem, ctx: EngineContext, workers: Workers, *, resume: bool) -> None:
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
            progress = run_round(exp, cfg, state, problem, ctx, workers, resume=resume)
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
