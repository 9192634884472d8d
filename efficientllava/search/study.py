"""Optuna side of a round: the study, its sampler, the Tune searcher, and reconciliation on resume.

Each round r has one Optuna study `round-<r>` in the experiment's journal file. The study is the
source of truth: which trials finished, with which values, and what TPE conditions on. Ray Tune's
own experiment state is only a by-product (see `efficientllava.search.driver` for why resume does
not use `Tuner.restore`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from efficientllava.config import ExperimentConfig, SearchConfig
from efficientllava.errors import ConfigError
from efficientllava.experiment import ExperimentDir
from efficientllava.search.problem import METRIC, MODE, RoundState

# Extra config keys the searcher adds next to the sampled params (read by the trainable).
NUMBER_KEY = "_trial_number"
RETRY_KEY = "_retry_of"
# Optuna user_attrs written by the machinery.
ATTR_TUNE_ID = "tune_trial_id"
ATTR_TRIAL_JSON = "trial_json"
ATTR_RETRY_OF = "retry_of"
ATTR_RETRY_REASON = "retry_reason"  # "interrupted" | "error"
ATTR_ERROR = "error"

STATUS_OK = "COMPLETE"
STATUS_ERROR = "ERROR"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_name(r: int) -> str:
    """The Optuna study name of round `r`."""
    return f"round-{r}"


def make_sampler(search: SearchConfig, seed: int, space: Any = None) -> optuna.samplers.BaseSampler:
    """The configured Optuna sampler (TPE: multivariate, constant liar for concurrent trials).

    `space` (levels, unit weights and budget as data) is what the budget-preserving evolution needs.
    """
    if search.sampler == "evolution":  # until the sampler registry (engine) replaces this function
        from efficientllava.search.samplers.evolution import make_evolution

        if space is None:
            raise ConfigError("search.sampler=evolution needs a problem with a sampler_space(state) method")
        return make_evolution(search, seed, space)
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(
            multivariate=True, constant_liar=True, n_startup_trials=search.n_startup_trials, seed=seed
        )
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # NSGA-II's first generation is random, so its population plays the part of n_startup_trials.
    return optuna.samplers.NSGAIISampler(population_size=max(2, search.n_startup_trials), seed=seed)


def round_seed(base: int, r: int, n_existing: int) -> int:
    """A sampler seed per (round, attempt): a resumed round must not replay the first attempt's draws."""
    digest = hashlib.sha256(f"{base}/{r}/{n_existing}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def repair_journal(exp: ExperimentDir) -> bool:
    """Drop a torn last line from the journal (a writer SIGKILLed mid-append); True if one was dropped.

    Optuna's journal reader skips an unterminated last line, but the next append would be glued to
    it and make the file unreadable. Call only while no other process writes this experiment.
    """
    path = exp.journal_path
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
    return True


def open_study(exp: ExperimentDir, r: int, sampler: optuna.samplers.BaseSampler | None = None,
               storage: Any = None) -> optuna.Study:
    """Open (or create) round `r`'s study in the experiment's journal storage."""
    return optuna.create_study(
        storage=storage if storage is not None else exp.storage(),
        study_name=study_name(r),
        sampler=sampler,
        direction="maximize" if MODE == "max" else "minimize",
        load_if_exists=True,
    )


class DefineSpace:
    """Picklable define-by-run space: calls `problem.define_space(trial, state)`.

    Tune pickles the searcher (tuner.pkl, experiment checkpoints); the problem may hold a model, so
    it is dropped from the pickle and rebuilt lazily from the config.
    """

    def __init__(self, cfg: ExperimentConfig, root: str, state: RoundState, problem: Any = None) -> None:
        self.cfg, self.root, self.state, self._problem = cfg, root, state, problem

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_problem": None}

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        if self._problem is None:
            from efficientllava.search.trainable import build_problem

            self._problem = build_problem(self.cfg, self.root)
        self._problem.define_space(trial, self.state)
        extra: dict[str, Any] = {NUMBER_KEY: trial.number}
        retry_of = trial.user_attrs.get(ATTR_RETRY_OF)
        if retry_of is not None:
            extra[RETRY_KEY] = retry_of
        return extra


class RoundSearch(OptunaSearch):
    """OptunaSearch that records the Tune trial id and the trial JSON path in each Optuna trial."""

    def __init__(self, *args: Any, experiment_root: str, round_: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._experiment_root = experiment_root
        self._round = round_

    def suggest(self, trial_id: str) -> dict | None:
        """Ask the study for the next params and tag the Optuna trial with Tune's id and the JSON path."""
        config = super().suggest(trial_id)
        if config is None:
            return None
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr(ATTR_TUNE_ID, trial_id)
        ot_trial.set_user_attr(
            ATTR_TRIAL_JSON, str(ExperimentDir(self._experiment_root).trial_path(self._round, ot_trial.number))
        )
        return config


def make_searcher(cfg: ExperimentConfig, exp: ExperimentDir, state: RoundState, problem: Any = None,
                  seed: int | None = None) -> ConcurrencyLimiter:
    """Round `state.round`'s Tune searcher: OptunaSearch on the round's study, concurrency-limited."""
    storage = exp.storage()
    if seed is None:
        n_existing = len(open_study(exp, state.round, storage=storage).get_trials(deepcopy=False))
        seed = round_seed(cfg.search.seed, state.round, n_existing)
    searcher = RoundSearch(
        space=DefineSpace(cfg, str(exp.root), state, problem),
        metric=METRIC,
        mode=MODE,
        sampler=make_sampler(cfg.search, seed, _sampler_space(cfg, exp, state, problem)),
        study_name=study_name(state.round),
        storage=storage,
        experiment_root=str(exp.root),
        round_=state.round,
    )
    # Without the limiter Tune asks for many trials at once and TPE runs far past n_startup_trials at random.
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.search.max_concurrent)


def _sampler_space(cfg: ExperimentConfig, exp: ExperimentDir, state: RoundState, problem: Any) -> Any:
    """The round's space as data, for samplers that need it (None otherwise, or when the problem has none)."""
    if cfg.search.sampler != "evolution":
        return None
    if problem is None:
        from efficientllava.search.trainable import build_problem

        problem = build_problem(cfg, exp.root)
    fn = getattr(problem, "sampler_space", None)
    return fn(state) if callable(fn) else None


@dataclass(frozen=True)
class RoundProgress:
    """Where a round stands after reconciling its study with the trial JSONs."""

    round: int
    done: int  # finished trials that count towards trials_per_round (COMPLETE, or ERROR not being retried)
    remaining: int  # trials still to run (re-enqueued ones included)
    told: tuple[int, ...] = ()  # RUNNING in the study but with a trial JSON: result told to the study
    interrupted: tuple[int, ...] = ()  # RUNNING without a result: marked FAIL and re-enqueued
    retried_errors: tuple[int, ...] = ()  # errored trials re-enqueued for their one retry


def read_round_records(exp: ExperimentDir, r: int) -> dict[int, dict[str, Any]]:
    """Trial JSONs of round `r`, keyed by Optuna trial number."""
    out: dict[int, dict[str, Any]] = {}
    for p in exp.trials_dir.glob(f"{r}-*.json"):
        rec = json.loads(p.read_text())
        if rec.get("round") == r:
            out[int(rec["number"])] = rec
    return out


def reconcile_round(exp: ExperimentDir, r: int, trials_per_round: int, *, retry_errors: bool) -> RoundProgress:
    """Make round `r`'s study agree with the trial JSONs on disk; return how many trials remain.

    - RUNNING in the study with a JSON on disk (killed between the JSON write and Tune's report):
      the JSON's outcome is told to the study, so the trial is neither lost nor repeated.
    - RUNNING without a JSON (interrupted mid-evaluation): marked FAIL, so constant_liar stops
      treating it as pending, and its params are re-enqueued once (`retry_of` = its number).
    - FAIL with an error JSON: re-enqueued once when `retry_errors` (on resume), unless it already
      is an error retry.
    Idempotent: a trial that already has a retry (any state) is never enqueued again.
    """
    storage = exp.storage()
    study = open_study(exp, r, storage=storage)
    records = read_round_records(exp, r)
    trials = study.get_trials(deepcopy=False)
    has_retry = {t.user_attrs[ATTR_RETRY_OF] for t in trials if ATTR_RETRY_OF in t.user_attrs}
    told: list[int] = []
    interrupted: list[int] = []
    retried: list[int] = []

    def enqueue(t: optuna.trial.FrozenTrial, reason: str) -> None:
        study.enqueue_trial(dict(t.params), user_attrs={ATTR_RETRY_OF: t.number, ATTR_RETRY_REASON: reason})
        has_retry.add(t.number)

    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        rec = records.get(t.number)
        if rec is not None and rec.get("status") == STATUS_OK and _finite(rec.get("objective")):
            study.tell(t.number, float(rec["objective"]))
            told.append(t.number)
        elif rec is not None:
            storage.set_trial_user_attr(t._trial_id, ATTR_ERROR, str(rec.get("error"))[:500])
            study.tell(t.number, state=TrialState.FAIL)
            told.append(t.number)
        else:
            storage.set_trial_user_attr(t._trial_id, ATTR_ERROR, "interrupted (no result on disk)")
            study.tell(t.number, state=TrialState.FAIL)
            interrupted.append(t.number)
            if t.number not in has_retry and t.params:
                enqueue(t, "interrupted")

    trials = study.get_trials(deepcopy=False)
    if retry_errors:
        for t in trials:
            rec = records.get(t.number)
            if (t.state == TrialState.FAIL and rec is not None and rec.get("status") == STATUS_ERROR
                    and t.number not in has_retry and t.user_attrs.get(ATTR_RETRY_REASON) != "error"):
                enqueue(t, "error")
                retried.append(t.number)

    done = 0
    for t in study.get_trials(deepcopy=False):
        if t.number in has_retry:
            continue  # superseded by its retry, which counts instead
        if t.state == TrialState.COMPLETE:
            done += 1
        elif t.state == TrialState.FAIL and records.get(t.number, {}).get("status") == STATUS_ERROR:
            done += 1
    return RoundProgress(
        round=r, done=done, remaining=max(0, trials_per_round - done),
        told=tuple(told), interrupted=tuple(interrupted), retried_errors=tuple(retried),
    )


def _finite(x: Any) -> bool:
    """True for a finite real number."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
