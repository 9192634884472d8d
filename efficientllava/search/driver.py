"""The driver: owns the round loop (Tune round, after_round, state.json) inside a named Ray actor.

Resume, and why it does not use `Tuner.restore`
-----------------------------------------------
Every round's Optuna study (in the experiment's journal file) and the trial JSONs (written by each
trial before it reports) are what a resume trusts; Tune's experiment state is not. A round, fresh or
interrupted, is run as: `reconcile_round` (tell the study results that reached disk but not Optuna,
fail + re-enqueue trials interrupted mid-evaluation, on resume re-enqueue errored trials once), then
a new Tuner on the same study for exactly the remaining count, repeated until the round has
`trials_per_round` finished trials. TPE sees every past trial because the study is shared.

`Tuner.restore(path, trainable, resume_errored=True)` was not used because, with OptunaSearch, it
cannot lose/repeat nothing provably (read from ray 2.60's tune/search/optuna/optuna_search.py and
tune_controller.py):
- the searcher (its `_ot_trials` map: Tune trial id -> Optuna trial) is pickled on the experiment
  checkpoint cadence while trial states are saved separately; a trial created after the last
  searcher snapshot is restarted by Tune, and its completion hits `self._ot_trials[trial_id]` ->
  KeyError, or is told to an Optuna trial that reconciliation already failed, which Optuna refuses
  (`on_trial_complete` only logs that warning): the result is lost from the study;
- a trial that finished (JSON on disk) after the last Tune checkpoint is RUNNING in the restored
  state and would be evaluated again;
- `resume_errored` re-runs an errored trial under the same, already FAILed, Optuna trial.
The journal study has none of these gaps: every ask/tell is appended to the file at once.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pandas as pd

from efficientllava.config import ExperimentConfig
from efficientllava.errors import EfficientLLaVAError
from efficientllava.experiment import (
    STATUS_DONE,
    STATUS_RUNNING,
    ExperimentDir,
    open_experiment,
    write_json_atomic,
)
from efficientllava.search.problem import METRIC, RoundState
from efficientllava.search.study import (
    NUMBER_KEY,
    RoundProgress,
    make_searcher,
    reconcile_round,
    repair_journal,
)
from efficientllava.search.trainable import build_problem, make_trainable
from efficientllava.trials import load_trials, write_best_policy, write_trials_parquet

NAMESPACE = "efficientllava"
MAX_ATTEMPTS = 3  # Tuner runs per round start; more than one only if trials die without a result

# Keep Tune's per-trial bookkeeping light: no CSV/JSON/TensorBoard result loggers per trial (the
# trial JSONs are the record), no per-trial checkpoints, and the classic reporter, whose verbose=1
# prints only the periodic status table (the new one prints two tables per trial).
TUNE_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0"}


def _trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default embeds every param)."""
    return str(trial.trial_id)


def run_round(exp: ExperimentDir, cfg: ExperimentConfig, state: RoundState, *, resume: bool,
              problem: Any = None, verbose: int = 1) -> RoundProgress:
    """Run round `state.round` until it has `trials_per_round` finished trials; returns its progress."""
    from ray import tune

    for k, v in TUNE_ENV.items():
        os.environ.setdefault(k, v)
    # Tune's ResultGrid looks for the per-trial result files we turned off; its warning is noise here.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    r, n = state.round, cfg.search.trials_per_round
    progress = reconcile_round(exp, r, n, retry_errors=resume)
    if resume and (progress.done or progress.interrupted or progress.retried_errors or progress.told):
        print(f"[efficientllava] round {r}: resuming with {progress.done} finished trials; "
              f"{len(progress.told)} results recovered from trial JSONs, {len(progress.interrupted)} interrupted "
              f"and {len(progress.retried_errors)} errored trials re-enqueued; {progress.remaining} to run", flush=True)
    for attempt in range(MAX_ATTEMPTS):
        if progress.remaining == 0:
            break
        tuner = tune.Tuner(
            make_trainable(cfg, exp, state),
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(cfg, exp, state, problem),
                num_samples=progress.remaining,
                reuse_actors=True,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{attempt}",
                storage_path=exp.tune_storage(r, cfg),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=0, checkpoint_at_end=False),
                verbose=verbose,
                progress_reporter=tune.CLIReporter(
                    metric_columns=[METRIC, "eval_s"], max_progress_rows=10, max_report_frequency=30,
                    parameter_columns={NUMBER_KEY: "number"}, sort_by_metric=True, metric=METRIC, mode="max",
                ),
                log_to_file=False,
            ),
        )
        tuner.fit()
        progress = reconcile_round(exp, r, n, retry_errors=False)
    if progress.remaining:
        print(f"[efficientllava] warning: round {r} ends with {progress.done}/{n} trials: "
              f"{MAX_ATTEMPTS} Tuner runs lost trials without a result (actor crashes?); see Tune's errors above",
              flush=True)
    return progress


def round_summary(trials: pd.DataFrame, r: int, seconds: float) -> str:
    """One line: best objective of round `r` (with accuracy / kept fraction when reported), #errored."""
    t = trials[trials["round"] == r]
    errored = int((t["status"] == "ERROR").sum())
    ok = t[(t["status"] == "COMPLETE") & t[METRIC].notna()]
    head = f"[efficientllava] round {r}: {len(t)} trials ({errored} errored) in {seconds:.1f} s"
    if ok.empty:
        return head + "; no successful trial"
    best = ok.loc[ok[METRIC].idxmax()]
    extra = "".join(f", {k} {best[k]:.4g}" for k in ("accuracy", "kept_fraction") if k in t and pd.notna(best[k]))
    mean_eval = ok["eval_s"].mean()
    return head + f"; best {METRIC} {best[METRIC]:.4g} (trial {r}-{int(best['number'])}{extra}); mean eval {mean_eval:.2f} s"


def _fail_if_nothing_succeeded(exp: ExperimentDir, trials: pd.DataFrame, r: int) -> None:
    """Stop the search when every trial of a round failed: the next round would have nothing to build on."""
    t = trials[trials["round"] == r]
    if (t["status"] == "COMPLETE").any():
        return
    if len(t) == 0:
        raise EfficientLLaVAError(f"round {r}: no trial finished (trial actors died?); see Tune's errors above")
    first = t.iloc[0]
    raise EfficientLLaVAError(
        f"round {r}: all {len(t)} trials failed; first error (trial {r}-{first['number']}): {first['error']}; "
        f"see {exp.trial_path(r, int(first['number']))}, fix the cause and run `efficientllava resume {exp.root}`"
    )


def finalize(exp: ExperimentDir) -> None:
    """Write the all-rounds outputs: trials.parquet and best_policy.json."""
    write_trials_parquet(exp.root)
    best = write_best_policy(exp.root)
    print(f"[efficientllava] done: {exp.trials_parquet}" + (f", {best}" if best else " (no successful trial)"),
          flush=True)


class SearchDriver:
    """The round loop of one experiment; run as a named Ray actor by `driver_actor` (or in-process)."""

    def __init__(self, experiment_root: str) -> None:
        self.exp = open_experiment(experiment_root)
        self.cfg = self.exp.load_config()

    def run(self, verbose: int = 1) -> str:
        """Run (or continue) every remaining round; returns the experiment directory."""
        exp, cfg = self.exp, self.cfg
        saved = exp.read_state()
        history = [RoundState(**s) for s in saved.get("history", [])]
        if saved["status"] == STATUS_DONE:
            finalize(exp)
            return str(exp.root)
        if repair_journal(exp):
            print(f"[efficientllava] dropped a partly written last line from {exp.journal_path}", flush=True)
        problem = build_problem(cfg, exp.root)
        resume = saved["status"] == STATUS_RUNNING
        state = exp.round_state()
        if state is None:
            state = problem.initial_state()
            exp.write_state(STATUS_RUNNING, state.round, state, history)
        while True:
            t0 = time.time()
            progress = run_round(exp, cfg, state, resume=resume, problem=problem, verbose=verbose)
            t1 = time.time()
            resume = False
            trials = load_trials(exp.root)
            print(round_summary(trials, state.round, t1 - t0), flush=True)
            _fail_if_nothing_succeeded(exp, trials, state.round)
            write_json_atomic(exp.round_dir(state.round) / f"timing-{int(t0)}.json", {
                "round": state.round, "started_at": t0, "finished_at": t1, "seconds": t1 - t0,
                "done": progress.done, "max_concurrent": cfg.search.max_concurrent,
            })
            write_trials_parquet(exp.root)
            if state.round + 1 >= cfg.search.rounds:
                break
            nxt = problem.after_round(state, trials)
            if nxt.round != state.round + 1:
                raise RuntimeError(f"after_round returned round {nxt.round}, expected {state.round + 1}")
            history.append(state)
            exp.write_state(STATUS_RUNNING, nxt.round, nxt, history)
            state = nxt
        exp.write_state(STATUS_DONE, state.round, state, history + [state])
        finalize(exp)
        return str(exp.root)


def driver_actor(exp: ExperimentDir) -> Any:
    """The experiment's named driver actor (created, or the live one if it already exists).

    It is pinned to the caller's node, whose filesystem holds the experiment directory.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(SearchDriver)
    return actor_cls.options(
        name=f"efficientllava-driver-{exp.name}",
        namespace=NAMESPACE,
        get_if_exists=True,
        num_cpus=0,
        max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(str(exp.root))

