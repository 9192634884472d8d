"""The Tune session's bookkeeping, without Ray: batches, hold trials, gates and the end of a run."""

from __future__ import annotations

import threading
import time

import pytest
from ray.tune.search import Searcher

from efficientllava.search.session import Batch, SessionClosed, TuneSession
from efficientllava.search.trainable import HOLD_KEY, ROUND_KEY


class FakePool:
    """Stands in for the worker pool actor: records the gates the session opens."""

    def __init__(self) -> None:
        self.opened: list[int] = []
        self.open_gate = self  # `pool.open_gate.remote(g)`

    def remote(self, gate: int) -> None:
        self.opened.append(gate)


class ListSearcher(Searcher):
    """Suggests x = 0, 1, 2, ... and remembers what it was told."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.told: list[tuple[str, bool]] = []

    def suggest(self, trial_id: str) -> dict | None:
        self.n += 1
        return {"x": self.n - 1}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.told.append((trial_id, error))


def session() -> tuple[TuneSession, FakePool]:
    pool = FakePool()
    return TuneSession(exp=None, storage="unused", pool=pool, objectives=(), slots=2), pool  # type: ignore[arg-type]


def run_in_thread(s: TuneSession, batch: Batch) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        try:
            s.run_batch(batch)
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def wait_until(cond, timeout: float = 5.0) -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def test_holds_fill_the_gaps_and_a_batch_ends_when_every_trial_is_recorded_and_told():
    s, pool = session()
    assert s.suggest("h0") == {HOLD_KEY: 0} and s.batch_of("h0") is None  # before any batch: a hold
    s.complete("h0", None, False)  # a hold is told to nobody

    searcher, recorded = ListSearcher(), []
    batch = Batch(0, searcher, 2, on_result=lambda t, r: recorded.append(t), on_error=lambda t: None)
    thread, out = run_in_thread(s, batch)
    wait_until(lambda: pool.opened == [0])  # installing the batch releases the gap's holds
    assert s.suggest("a") == {"x": 0, ROUND_KEY: 0}
    assert s.suggest("b") == {"x": 1, ROUND_KEY: 0}
    assert s.suggest("c") == {HOLD_KEY: 1}, "a full batch hands out holds for the next gap"
    assert s.batch_of("a") is batch and s.batch_of("c") is None

    batch.settle("a", "recorded")
    s.complete("a", {"m": 1}, False)
    batch.settle("b", "recorded")
    time.sleep(0.1)
    assert thread.is_alive(), "b was recorded but not yet told to the searcher"
    s.complete("b", None, True)
    thread.join(5)
    assert not thread.is_alive() and "error" not in out
    assert searcher.told == [("a", False), ("b", True)]

    s.finish()
    assert s.suggest("d") == Searcher.FINISHED
    assert pool.opened == [0, 1], "finishing releases the holds waiting for the next batch"


def test_a_batch_waiting_when_tunes_loop_ends_raises_session_closed():
    s, _ = session()
    batch = Batch(0, ListSearcher(), 3, on_result=lambda t, r: None, on_error=lambda t: None)
    thread, out = run_in_thread(s, batch)
    wait_until(lambda: s.suggest("a") != {HOLD_KEY: 0})
    s._closed = True  # what `run` sets when Tune's fit returns or raises
    thread.join(5)
    assert isinstance(out.get("error"), SessionClosed)
    with pytest.raises(SessionClosed):
        s.run_batch(Batch(1, ListSearcher(), 1, on_result=lambda t, r: None, on_error=lambda t: None))


def test_an_empty_batch_returns_at_once_and_opens_no_gate():
    s, pool = session()
    s.run_batch(Batch(0, ListSearcher(), 0, on_result=lambda t, r: None, on_error=lambda t: None))
    assert pool.opened == [] and s.suggest("h") == {HOLD_KEY: 0}


def test_a_batch_searcher_with_nothing_to_suggest_gets_asked_again_not_a_hold():
    """A hold waits for the next batch: handing one out while this batch still has trials to run could fill every
    forwarder with holds and leave the batch waiting forever."""

    class Slow(ListSearcher):
        def suggest(self, trial_id: str) -> dict | None:
            return None if self.n == 0 and trial_id == "a" else super().suggest(trial_id)

    s, pool = session()
    batch = Batch(0, Slow(), 1, on_result=lambda t, r: None, on_error=lambda t: None)
    thread, _ = run_in_thread(s, batch)
    wait_until(lambda: pool.opened == [0])
    assert s.suggest("a") is None
    assert s.suggest("b") == {"x": 0, ROUND_KEY: 0}
    batch.settle("b", "recorded")
    s.complete("b", None, False)
    thread.join(5)
    assert not thread.is_alive()
