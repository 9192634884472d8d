"""One Ray Tune run per driver run: the round loop hands it batches of trials.

Why not one `Tuner` per round: each Tuner starts its forwarder processes again (3-5 s per round on
2 cores, measured with `benchmarks/ray_overhead.py`), and even a single Tuner loses its forwarders
at an idle gap: Tune's actor cache is `_ObjectCache(may_keep_one=True)` (ray 2.60,
`tune/execution/tune_controller.py`), so while no trial is staged it keeps one idle actor and stops
the rest. So `SessionSearch` never leaves a forwarder idle. While the round loop works between
rounds (reconciliation, the projector round, the workers entering the next round) and before the
first round (workers loading), it hands out *hold* trials. A hold waits at the worker pool's gate
(`WorkerPool.hold`) until a trial of the next batch releases it, or the search ends, then returns. Holds leave
no trace: no record, no Optuna trial.

The same cache also decides whether a forwarder that just finished a trial lives on: Tune keeps it
only for a trial already staged (waiting for an actor), else at most one. So (1) the limiter lets one
batch trial more than there are forwarders be live, which keeps a staged trial ready for each freed
forwarder (its own actor request waits: the forwarders' resource share has no room for another), and
(2) the holds of a gap are released one at a time, each by the batch trial that will take its
forwarder: released together, all but one forwarder would be stopped and Tune would start new
processes for the next trials (measured: about one new forwarder process per trial on 2 cores).

Threads: Tune's loop (`Tuner.fit`) runs in the calling thread, so SIGINT and Tune behave as in a
plain Tune run; the round loop runs in a helper thread and blocks in `run_batch` while its batch
runs. Tune calls the searcher and the callback from its loop only; a lock guards what both share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray import tune
from ray.tune.error import TuneError
from ray.tune.search import ConcurrencyLimiter, Searcher

from efficientllava.errors import DiskFullError, EfficientLLaVAError
from efficientllava.experiment import ExperimentDir
from efficientllava.log import get_logger
from efficientllava.search.api import Objective
from efficientllava.search.trainable import HOLD_KEY, ROUND_KEY, make_trainable

log = get_logger(__name__)
T = TypeVar("T")

# Keep Tune's per-trial bookkeeping light and quiet: no CSV/JSON/TensorBoard result loggers per trial
# (the records are the record), no status tables (the progress line replaces them), and a SIGINT
# that reaches our code as KeyboardInterrupt instead of Tune's graceful stop (which would let the
# round loop go on).
TUNE_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0",
            "TUNE_DISABLE_SIGINT_HANDLER": "1", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "60",
            # Tune's experiment checkpoints (searcher state) are never read back (resume trusts the
            # journal and the records): rarely, not on Tune's "auto" cadence.
            "TUNE_GLOBAL_CHECKPOINT_S": "300"}


class SessionClosed(EfficientLLaVAError):
    """Tune's loop ended (an error, or an interrupt) while the round loop waited on a batch."""


@dataclass(eq=False)
class Batch:
    """`count` trials of round `round`, suggested by `searcher` (an Optuna-backed Tune searcher).

    `on_result(trial, result)` records a trial's outcome and `on_error(trial)` one whose forwarder
    died; both run in Tune's loop. The batch is done when every trial was handed out, recorded and
    told to the searcher (Tune records before it tells for results, and tells first for errors).
    """

    round: int
    searcher: Searcher
    count: int
    on_result: Callable[[Any, dict[str, Any]], None]
    on_error: Callable[[Any], None]
    handed: int = 0
    unsettled: dict[str, set[str]] = field(default_factory=dict)  # trial id -> what is missing: told/recorded
    done: threading.Event = field(default_factory=threading.Event)

    def settle(self, trial_id: str, what: str) -> None:
        """Mark `what` ("told" or "recorded") of a trial; set `done` once nothing is missing."""
        missing = self.unsettled.get(trial_id)
        if missing is None:
            return
        missing.discard(what)
        if not missing:
            del self.unsettled[trial_id]
        if self.handed >= self.count and not self.unsettled:
            self.done.set()


class SessionSearch(Searcher):
    """The Tune searcher of a session: the current batch's suggestions, else hold trials."""

    def __init__(self, session: TuneSession) -> None:
        super().__init__()
        self._session = session

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Each batch's searcher has its own metric and space; nothing to set here."""
        return True

    def suggest(self, trial_id: str) -> dict | None:
        """The next config of the current batch, a hold while there is none, FINISHED at the end."""
        return self._session.suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell the trial's batch searcher (holds are dropped)."""
        self._session.complete(trial_id, result, error)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """No searcher checkpoints: resume reads the Optuna journal and the records, never Tune's state."""
        return None


class _Recorder(tune.Callback):
    """Routes Tune's per-trial callbacks to the trial's batch (holds have none)."""

    def __init__(self, session: TuneSession) -> None:
        self.session = session

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        """A finished evaluation: the batch records it."""
        batch = self.session.batch_of(trial.trial_id)
        if batch is not None:
            self._record(batch, trial, lambda: batch.on_result(trial, result))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial whose forwarder or worker died: the batch records it."""
        batch = self.session.batch_of(trial.trial_id)
        if batch is not None:
            self._record(batch, trial, lambda: batch.on_error(trial))

    def _record(self, batch: Batch, trial: Any, write: Callable[[], None]) -> None:
        """Write a record; a user-facing error (e.g. disk full) is kept for `run` to raise as itself,
        and stops Tune (which would wrap it in a TuneError traceback)."""
        try:
            write()
        except EfficientLLaVAError as exc:
            self.session.record_error = exc
            raise
        with self.session.lock:
            batch.settle(trial.trial_id, "recorded")


def _trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default embeds every param)."""
    return str(trial.trial_id)


class TuneSession:
    """One `Tuner` for every round of a driver run; `run(body)` runs the round loop beside it."""

    def __init__(self, exp: ExperimentDir, storage: str, pool: Any, objectives: tuple[Objective, ...],
                 slots: int) -> None:
        self.exp, self.storage, self.pool, self.slots = exp, storage, pool, slots
        self.objectives = objectives
        self.lock = threading.Lock()
        self._batch: Batch | None = None
        self._owner: dict[str, Batch | None] = {}  # trial id -> its batch (None: a hold)
        self.record_error: EfficientLLaVAError | None = None
        self._gate = 0  # the gate the holds handed out now wait at: released one by one by the next batch's trials
        self._waiting: dict[int, int] = {}  # gate -> its holds not released yet
        self._live: set[str] = set()  # trials handed to Tune and not complete (holds included)
        self._finished = False
        self._closed = False
        self.holds = 0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its searcher and callbacks into tuner.pkl (for `Tuner.restore`, never used here).
        return {}

    # --- Tune's side (its loop thread) ---
    def suggest(self, trial_id: str) -> dict | None:
        """See `SessionSearch.suggest`."""
        with self.lock:
            if self._finished:
                return Searcher.FINISHED  # type: ignore[return-value]  # Tune's sentinel is a str
            batch = self._batch
            if batch is not None and batch.handed < batch.count:
                config = batch.searcher.suggest(trial_id)
                if config is None:
                    # Not now (Tune asks again). Never a hold here: a hold waits for the *next* batch, and
                    # holds in every slot would leave this batch's trials no forwarder.
                    return None
                batch.handed += 1
                batch.unsettled[trial_id] = {"told", "recorded"}
                self._owner[trial_id] = batch
                self._live.add(trial_id)
                self._release_one()  # this trial takes the forwarder of the hold released now
                return {**config, ROUND_KEY: batch.round}
            if len(self._live) >= self.slots:
                return None  # a staged hold would take the next free forwarder from the next batch
            self._owner[trial_id] = None
            self._live.add(trial_id)
            self._waiting[self._gate] = self._waiting.get(self._gate, 0) + 1
            self.holds += 1
            return {HOLD_KEY: self._gate}

    def _release_one(self) -> None:
        """Let the oldest waiting hold return (the caller holds the lock)."""
        for gate in sorted(g for g, n in self._waiting.items() if n > 0 and g < self._gate):
            self._waiting[gate] -= 1
            self.pool.release.remote(gate)
            return

    def complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        """See `SessionSearch.on_trial_complete`."""
        with self.lock:
            self._live.discard(trial_id)
        batch = self.batch_of(trial_id)
        if batch is None:
            return
        batch.searcher.on_trial_complete(trial_id, result=result, error=error)
        with self.lock:
            batch.settle(trial_id, "told")

    def batch_of(self, trial_id: str) -> Batch | None:
        """The batch a trial belongs to (None for a hold)."""
        with self.lock:
            return self._owner.get(trial_id)

    # --- the round loop's side (its helper thread) ---
    def run_batch(self, batch: Batch) -> None:
        """Hand `batch` to Tune and block until every one of its trials is recorded and told."""
        with self.lock:
            if self._closed:
                raise SessionClosed("Ray Tune's loop has ended")
            if batch.count <= 0:
                return
            self._batch = batch
            if self._gate == 0:  # the first gap's holds are every forwarder started so far: they wait for each other
                self.pool.expect_forwarders.remote(self._waiting.get(0, 0))
            self._gate += 1  # each trial handed out from now releases one hold of the gap (`suggest`)
        try:
            while not batch.done.wait(0.05):
                if self._closed:
                    raise SessionClosed("Ray Tune's loop ended before the round's trials finished")
        finally:
            with self.lock:
                self._batch = None

    def finish(self) -> None:
        """No more batches: Tune winds down once the live trials (holds included) are done; idempotent."""
        with self.lock:
            self._finished = True
            gate = self._gate
        with contextlib.suppress(ray.exceptions.RayError):  # a pool already gone: the search is ending anyway
            self.pool.open_gate.remote(gate)

    # --- the whole run (the calling thread) ---
    def run(self, body: Callable[[TuneSession], T]) -> T:
        """Run `body(self)` (the round loop) in a helper thread while Tune's loop runs here; returns its value.

        A user error from recording (e.g. a full disk) is raised as itself; then the body's own error;
        then Tune's. On an interrupt the body is left to die with the workers (it is a daemon thread).
        """
        for k, v in TUNE_ENV.items():
            os.environ.setdefault(k, v)
        # Tune's ResultGrid looks for the per-trial result files we turned off; its warning is noise here.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        out: dict[str, Any] = {}

        def target() -> None:
            try:
                out["value"] = body(self)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                out["error"] = exc
            finally:
                self.finish()

        tuner = self._tuner()
        thread = threading.Thread(target=target, name="efficientllava-rounds", daemon=True)
        thread.start()
        fit_error: TuneError | None = None
        try:
            tuner.fit()
        except TuneError as exc:
            fit_error = exc
        finally:
            self._closed = True  # a body waiting on a batch stops waiting
        thread.join()
        if self.record_error is not None:
            raise self.record_error from None
        error = out.get("error")
        if error is not None and not (isinstance(error, SessionClosed) and fit_error is not None):
            raise error
        if fit_error is not None:
            if "No space left on device" in str(fit_error):  # one of Tune's own files
                raise DiskFullError(f"{self.storage}: no space left on device (Ray Tune's files); free space "
                                    f"and run `efficientllava resume {self.exp.root}`") from None
            raise fit_error
        log.debug("Tune session ended: %d hold trials", self.holds)
        return out["value"]  # type: ignore[no-any-return]

    def _tuner(self) -> tune.Tuner:
        return tune.Tuner(
            make_trainable(self.pool, self.objectives, slots=self.slots),
            # The limiter keeps `slots` forwarders busy plus one staged trial (see the module docstring), and
            # lets Tune stage as many at once (without one Tune stages a custom searcher's trials one at a time).
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(SessionSearch(self), max_concurrent=self.slots + 1),
                                        num_samples=-1, reuse_actors=True, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=self.storage,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=0, checkpoint_at_end=False),
                verbose=0,
                callbacks=[_Recorder(self)],
                log_to_file=False,
            ),
        )
