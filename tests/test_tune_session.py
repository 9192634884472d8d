"""The Tune session's bookkeeping, without Ray: batches, hold trials, gates and the end of a run."""

from __future__ import annotations

import threading
import time

import pytest
from ray.tune.search import Searcher

from efficientllava.search.session import Batch, SessionClosed, TuneSession
from efficientllava.search.trainable import HOLD_KEY, ROUND_KEY


class Recorded:
    """`pool.<method>.remote(x)`: appends x."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def remote(self, value: int) -> None:
        self.calls.append(value)


class FakePool:
    """Stands in for the worker pool actor: records the gates the session opens and the holds it releases."""

    def __init__(self) -> None:
        self.open_gate, self.release, self.expect_forwarders = Recorded(), Recorded(), Recorded()

    @property
    def opened(self) -> list[int]:
        return self.open_gate.calls

    @property
    def released(self) -> list[int]:
        return self.release.calls


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
    s, pool = session()  # 2 forwarders
    assert s.suggest("h0") == {HOLD_KEY: 0} and s.batch_of("h0") is None  # before any batch: a hold
    assert s.suggest("h1") == {HOLD_KEY: 0}
    assert s.suggest("h2") is None, "no staged hold: it would take the next free forwarder from the batch"

    searcher, recorded = ListSearcher(), []
    batch = Batch(0, searcher, 2, on_result=lambda t, r: recorded.append(t), on_error=lambda t: None)
    thread, out = run_in_thread(s, batch)
    wait_until(lambda: s._batch is batch)
    assert pool.released == [], "installing a batch releases nothing by itself"
    assert pool.expect_forwarders.calls == [2], "the first gap's two holds wait for each other"
    # Each trial handed out releases one hold of the gap: the freed forwarder takes that trial.
    assert s.suggest("a") == {"x": 0, ROUND_KEY: 0} and pool.released == [0]
    s.complete("h0", None, False)  # a hold is told to nobody
    assert s.suggest("b") == {"x": 1, ROUND_KEY: 0} and pool.released == [0, 0]
    s.complete("h1", None, False)
    assert s.suggest("c") is None, "a and b hold both forwarders: no hold staged behind them"
    batch.settle("a", "recorded")
    s.complete("a", {"m": 1}, False)
    assert s.suggest("c") == {HOLD_KEY: 1}, "a handed-out batch gets holds for the next gap"
    assert s.batch_of("a") is batch and s.batch_of("c") is None
    batch.settle("b", "recorded")
    time.sleep(0.1)
    assert thread.is_alive(), "b was recorded but not yet told to the searcher"
    s.complete("b", None, True)
    thread.join(5)
    assert not thread.is_alive() and "error" not in out
    assert searcher.told == [("a", False), ("b", True)]

    s.finish()
    assert s.suggest("e") == Searcher.FINISHED
    assert pool.opened == [1], "finishing opens the gate the last holds wait at"


def test_a_batch_waiting_when_tunes_loop_ends_raises_session_closed():
    s, _ = session()
    batch = Batch(0, ListSearcher(), 3, on_result=lambda t, r: None, on_error=lambda t: None)
    thread, out = run_in_thread(s, batch)
    wait_until(lambda: s._batch is batch)
    s._closed = True  # what `run` sets when Tune's fit returns or raises
    thread.join(5)
    assert isinstance(out.get("error"), SessionClosed)
    with pytest.raises(SessionClosed):
        s.run_batch(Batch(1, ListSearcher(), 1, on_result=lambda t, r: None, on_error=lambda t: None))


def test_an_empty_batch_returns_at_once_and_opens_no_gate():
    s, pool = session()
    s.run_batch(Batch(0, ListSearcher(), 0, on_result=lambda t, r: None, on_error=lambda t: None))
    assert pool.opened == pool.released == [] and s.suggest("h") == {HOLD_KEY: 0}


def test_a_batch_searcher_with_nothing_to_suggest_gets_asked_again_not_a_hold():
    """A hold waits for the next batch: handing one out while this batch still has trials to run could fill every
    forwarder with holds and leave the batch waiting forever."""

    class Slow(ListSearcher):
        def suggest(self, trial_id: str) -> dict | None:
            return None if self.n == 0 and trial_id == "a" else super().suggest(trial_id)

    s, pool = session()
    batch = Batch(0, Slow(), 1, on_result=lambda t, r: None, on_error=lambda t: None)
    thread, _ = run_in_thread(s, batch)
    wait_until(lambda: s._batch is batch)
    assert s.suggest("a") is None
    assert s.suggest("b") == {"x": 0, ROUND_KEY: 0}
    batch.settle("b", "recorded")
    s.complete("b", None, False)
    thread.join(5)
    assert not thread.is_alive()


def test_pool_gates_release_holds_one_at_a_time_after_every_forwarder_arrived():
    """The pool side of holds: a release lets one hold return; the first gap waits for every forwarder."""
    import asyncio

    from efficientllava.search.workers import WorkerPool

    async def scenario() -> None:
        pool = WorkerPool()
        await pool.expect_forwarders(2)
        first = asyncio.ensure_future(pool.hold(0))
        await pool.release(0)
        await asyncio.sleep(0.05)
        assert not first.done(), "a release in the first gap waits until every forwarder holds"
        second = asyncio.ensure_future(pool.hold(0))
        done, waiting = await asyncio.wait({first, second}, timeout=2, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.05)
        assert len(done) == 1 and not any(t.done() for t in waiting), "both here: one release, one hold returns"
        later = [asyncio.ensure_future(pool.hold(1)) for _ in range(2)]
        await pool.release(1)  # later gaps: no barrier
        await asyncio.sleep(0.05)
        assert sum(t.done() for t in later) == 1
        await pool.open_gate(1)  # the end of the search: every hold up to gate 1 returns
        await asyncio.wait_for(asyncio.gather(*waiting, *later), 2)

    asyncio.run(scenario())
