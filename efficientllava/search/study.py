"""Optuna side of a round: the study, the Tune searcher, trial numbers, and reconciliation on resume.

Each round r has one Optuna study `round-<r>` in the experiment's journal file. The study is the
source of truth for what the sampler conditions on; the trial records (written by the driver before
Optuna hears of an outcome) are the source of truth for results. Ray Tune's own experiment state is
only a by-product (see `efficientllava.search.driver` for why resume does not use `Tuner.restore`).

Trial identity: the engine numbers each round's trials itself (0, 1, ... per round) and stores the
number in the Optuna trial's user attrs (`number`); records are `trials/<round>-<number>.json`.
Optuna's own trial numbers are never used, so a study rebuilt from the records cannot collide.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from efficientllava.experiment import ExperimentDir
from efficientllava.search.api import (
    ATTRIBUTION_ATTR,
    ATTRIBUTION_PREFIX,
    METRIC,
    Objective,
    Space,
    TrialStatus,
)
from efficientllava.search.samplers import make_sampler
from efficientllava.search.trainable import NUMBER_KEY, RETRY_KEY, SEED_KEY
from efficientllava.trials import read_record

# Optuna user_attrs written by the engine.
ATTR_NUMBER = "number"
ATTR_TUNE_ID = "tune_trial_id"
ATTR_RETRY_OF = "retry_of"
ATTR_RETRY_REASON = "retry_reason"  # "interrupted" | "error"
ATTR_SEED = "seed"  # name of a seed point the problem asked to evaluate first
ATTR_ERROR = "error"
TUNE_RESULT = "outcome/result/"  # a trial's problem result, as the searcher sees it

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_name(r: int) -> str:
    """The Optuna study name of round `r`."""
    return f"round-{r}"


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


def open_study(exp: ExperimentDir, r: int, objectives: Sequence[Objective] = (Objective(METRIC, "max"),),
               sampler: optuna.samplers.BaseSampler | None = None, storage: Any = None) -> optuna.Study:
    """Open (or create) round `r`'s study in the experiment's journal storage."""
    return optuna.create_study(
        storage=storage if storage is not None else exp.storage(),
        study_name=study_name(r),
        sampler=sampler,
        directions=["maximize" if o.mode == "max" else "minimize" for o in objectives],
        load_if_exists=True,
    )


def distributions(space: Space) -> dict[str, IntDistribution]:
    """The space as Optuna distributions (every parameter an integer range)."""
    return {p.name: IntDistribution(p.low, p.high) for p in space.params}


def trial_number(t: optuna.trial.FrozenTrial) -> int | None:
    """The engine's number of an Optuna trial (None for one killed before it got a number)."""
    n = t.user_attrs.get(ATTR_NUMBER)
    return None if n is None else int(n)


def enqueue_seeds(study: optuna.Study, seeds: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Enqueue each named seed point once per study (idempotent across resumes); returns the new names."""
    present = {t.user_attrs.get(ATTR_SEED) for t in study.get_trials(deepcopy=False)}
    added = []
    for name, params in seeds.items():
        if name not in present:
            study.enqueue_trial(dict(params), user_attrs={ATTR_SEED: name})
            added.append(name)
    return added


class RoundSearch(OptunaSearch):
    """OptunaSearch on a round's study that numbers trials itself and tells errors as FAIL.

    Each suggested config carries the engine's trial number (and retry/seed tags); the Tune trial id
    is stored on the Optuna trial. A result whose `status` is ERROR is told as a failed trial.
    """

    def __init__(self, *args: Any, first_number: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_number = first_number

    def suggest(self, trial_id: str) -> dict | None:
        """Ask the study for the next params and tag the Optuna trial with its number and Tune's id."""
        config = super().suggest(trial_id)
        if config is None:
            return None
        ot_trial = self._ot_trials[trial_id]
        number = self._next_number
        self._next_number += 1
        ot_trial.set_user_attr(ATTR_NUMBER, number)
        ot_trial.set_user_attr(ATTR_TUNE_ID, trial_id)
        extra: dict[str, Any] = {NUMBER_KEY: number}
        attrs = ot_trial.user_attrs  # fixed params of an enqueued trial come with its user attrs
        if attrs.get(ATTR_RETRY_OF) is not None:
            extra[RETRY_KEY] = int(attrs[ATTR_RETRY_OF])
        if attrs.get(ATTR_SEED) is not None:
            extra[SEED_KEY] = str(attrs[ATTR_SEED])
        return {**config, **extra}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """One-step trials: no intermediate values to report (saves a journal write per trial)."""
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell the study (with the result's attributions as a user attr); an ERROR result is a failed trial."""
        if result is not None and result.get("status") == TrialStatus.ERROR.value:
            super().on_trial_complete(trial_id, None, error=True)
            return
        # Tune hands searchers the forwarder's {"outcome": {"result": ...}} flattened to "outcome/result/<key>".
        shares = attribution_of({k[len(TUNE_RESULT):]: v for k, v in (result or {}).items()
                                 if k.startswith(TUNE_RESULT)})
        if shares and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(ATTRIBUTION_ATTR, shares)
        super().on_trial_complete(trial_id, result, error=error)


def attribution_of(result: Mapping[str, Any] | None) -> dict[str, float]:
    """The `attribution/<param>` entries of a trial result, by parameter (empty when it has none)."""
    if not result:
        return {}
    return {k[len(ATTRIBUTION_PREFIX):]: float(v) for k, v in result.items()
            if k.startswith(ATTRIBUTION_PREFIX) and isinstance(v, (int, float)) and math.isfinite(v)}


def next_number(exp: ExperimentDir, r: int, study: optuna.Study) -> int:
    """The first unused trial number of round `r` (over the study's numbers and the records on disk)."""
    used = [n for t in study.get_trials(deepcopy=False) if (n := trial_number(t)) is not None]
    used += list(read_round_records(exp, r))
    return max(used, default=-1) + 1


def make_searcher(exp: ExperimentDir, r: int, space: Space, objectives: Sequence[Objective], search: Any,
                  seed: int | None = None) -> RoundSearch:
    """Round `r`'s Tune searcher: OptunaSearch on the round's study over `space`.

    `objectives` are the study's objectives (one for single-objective samplers, the problem's
    objectives for a multi-objective one). The session limits the trials in flight
    (`efficientllava.search.session`): without a limit Tune asks for many trials at once and TPE
    runs far past n_startup_trials at random.
    """
    storage = exp.storage()
    study = open_study(exp, r, objectives, storage=storage)
    if seed is None:
        seed = round_seed(search.seed, r, len(study.get_trials(deepcopy=False)))
    multi = len(objectives) > 1
    return RoundSearch(
        space=distributions(space),
        metric=[o.name for o in objectives] if multi else objectives[0].name,
        mode=[o.mode for o in objectives] if multi else objectives[0].mode,
        sampler=make_sampler(search, seed, space),
        study_name=study_name(r),
        storage=storage,
        first_number=next_number(exp, r, study),
    )


@dataclass(frozen=True)
class RoundProgress:
    """Where a round stands after reconciling its study with the trial records."""

    round: int
    done: int  # finished trials that count towards trials_per_round (COMPLETE, or ERROR not being retried)
    remaining: int  # trials still to run (re-enqueued ones included)
    told: tuple[int, ...] = ()  # RUNNING in the study but with a record: its outcome told to the study
    interrupted: tuple[int, ...] = ()  # started without a result: marked FAIL and re-enqueued
    retried_errors: tuple[int, ...] = ()  # errored trials re-enqueued for their one retry


def read_round_records(exp: ExperimentDir, r: int) -> dict[int, dict[str, Any]]:
    """Trial records of round `r`, keyed by the engine's trial number."""
    out: dict[int, dict[str, Any]] = {}
    for p in exp.trials_dir.glob(f"{r}-*.json"):
        if p.name.startswith("."):
            continue
        rec = read_record(p)
        if rec.get("round") == r:
            out[int(rec["number"])] = rec
    return out


def record_values(rec: Mapping[str, Any], objectives: Sequence[Objective]) -> list[float] | None:
    """A completed record's objective values, in study order (None if one is not finite)."""
    values = []
    for o in objectives:
        v = rec.get("objective") if o.name == METRIC else (rec.get("result") or {}).get(o.name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return None
        values.append(float(v))
    return values


def reconcile_round(exp: ExperimentDir, r: int, trials_per_round: int, *, retry_errors: bool,
                    objectives: Sequence[Objective] = (Objective(METRIC, "max"),)) -> RoundProgress:
    """Make round `r`'s study agree with the trial records on disk; return how many trials remain.

    - RUNNING in the study with a record (killed between the record write and Optuna's tell):
      the record's outcome is told to the study, so the trial is neither lost nor repeated.
    - RUNNING without a record (interrupted mid-evaluation), or FAIL without a record (the driver
      was killed after Tune failed a trial and before its error record was written): FAIL, so
      constant_liar stops treating it as pending, and its params are re-enqueued once
      (`retry_of` = its number).
    - FAIL with an error record: re-enqueued once when `retry_errors` (on resume), unless it
      already is an error retry.
    - A trial killed before it got a number never reached a worker: failed, not re-run. (A COMPLETE
      trial without a number, added to the study as history, counts as done.)
    Idempotent: a trial that already has a retry (any state) is never enqueued again.
    """
    storage = exp.storage()
    study = open_study(exp, r, objectives, storage=storage)
    records = read_round_records(exp, r)
    trials = study.get_trials(deepcopy=False)
    has_retry = {int(t.user_attrs[ATTR_RETRY_OF]) for t in trials if ATTR_RETRY_OF in t.user_attrs}
    told: list[int] = []
    interrupted: list[int] = []
    retried: list[int] = []

    def enqueue(t: optuna.trial.FrozenTrial, number: int, reason: str) -> None:
        study.enqueue_trial(dict(t.params), user_attrs={ATTR_RETRY_OF: number, ATTR_RETRY_REASON: reason})
        has_retry.add(number)

    for t in trials:
        number = trial_number(t)
        if t.state == TrialState.RUNNING and number is None:
            study.tell(t.number, state=TrialState.FAIL)
            continue
        if number is None or t.state not in (TrialState.RUNNING, TrialState.FAIL):
            continue
        rec = records.get(number)
        if t.state == TrialState.RUNNING and rec is not None:
            values = record_values(rec, objectives) if rec.get("status") == TrialStatus.COMPLETE.value else None
            if values is not None:
                shares = attribution_of(rec.get("result"))
                if shares:
                    storage.set_trial_user_attr(t._trial_id, ATTRIBUTION_ATTR, shares)
                study.tell(t.number, values if len(values) > 1 else values[0])
            else:
                storage.set_trial_user_attr(t._trial_id, ATTR_ERROR, str(rec.get("error"))[:500])
                study.tell(t.number, state=TrialState.FAIL)
            told.append(number)
        elif rec is None:
            if t.state == TrialState.RUNNING:
                storage.set_trial_user_attr(t._trial_id, ATTR_ERROR, "interrupted (no result recorded)")
                study.tell(t.number, state=TrialState.FAIL)
            if number not in has_retry and t.params:
                interrupted.append(number)
                enqueue(t, number, "interrupted")

    if retry_errors:
        for t in study.get_trials(deepcopy=False):
            number = trial_number(t)
            rec = records.get(number) if number is not None else None
            if (t.state == TrialState.FAIL and rec is not None and rec.get("status") == TrialStatus.ERROR.value
                    and number not in has_retry and t.user_attrs.get(ATTR_RETRY_REASON) != "error"):
                enqueue(t, number, "error")  # type: ignore[arg-type]
                retried.append(number)  # type: ignore[arg-type]

    done = 0
    for t in study.get_trials(deepcopy=False):
        number = trial_number(t)
        if number is None:
            done += t.state == TrialState.COMPLETE  # history added to the study directly counts; the rest never ran
            continue
        if number in has_retry:
            continue  # superseded by its retry, which counts instead
        if t.state == TrialState.COMPLETE:
            done += 1
        elif t.state == TrialState.FAIL and records.get(number, {}).get("status") == TrialStatus.ERROR.value:
            done += 1
    return RoundProgress(
        round=r, done=done, remaining=max(0, trials_per_round - done),
        told=tuple(told), interrupted=tuple(interrupted), retried_errors=tuple(retried),
    )
