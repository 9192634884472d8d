"""Long-lived evaluation workers and the pool that hands them trials.

The driver starts `search.max_concurrent` `EvalWorker` actors (each with the configured
`resources.cpu/gpu`) once per search. Each builds the problem and keeps its heavy state (a model,
encoded data, a variant bank) for the whole search: a round boundary only sends the round's inputs
(through Ray's object store) and the problem swaps them in (`enter_round`). The model is loaded
once per worker per search.

Tune's trials are thin forwarders (`efficientllava.search.trainable`): each sends its params to the
`WorkerPool`, an async actor that awaits a free worker, runs the evaluation there and releases the
worker in `finally`, so every worker takes trials whatever Tune's actor placement. The driver runs
between-round work on a worker through the same pool (`WorkerPool.call`).

Workers never touch the experiment directory: results go back to the driver as return values, and so
do their log records (below --verbose): the driver relays them after each round entry and between-round
call, and before it stops the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import numbers
import os
import socket
import time
import traceback
from collections.abc import AsyncIterator, Mapping
from typing import Any

import ray

from efficientllava.errors import EfficientLLaVAError
from efficientllava.log import configure, current_level, drain, get_logger, replay
from efficientllava.search.api import Objective, RoundState, TrialStatus, build_problem

log = get_logger(__name__)
NAMESPACE = "efficientllava"


def unwrap(exc: BaseException) -> BaseException:
    """The user error inside Ray's task-error wrappers (worker -> pool -> driver), else `exc` itself."""
    cause: BaseException | None = exc
    while isinstance(cause, ray.exceptions.RayTaskError):
        cause = getattr(cause, "cause", None)
    return cause if isinstance(cause, EfficientLLaVAError) else exc


def _get(ref: Any) -> Any:
    """`ray.get`, with a problem's user errors (ConfigError, ...) raised as themselves: one line in the CLI."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = unwrap(exc)
        if cause is exc:
            raise
        raise cause from None


def _alive(pid: int) -> bool:
    """Whether process `pid` still exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def check_result(result: Any, objectives: tuple[Objective, ...]) -> dict[str, Any]:
    """A problem's result: a mapping with a finite number for every objective; returned as a dict."""
    if not isinstance(result, Mapping):
        raise TypeError(f"evaluate() returned {type(result).__name__}, expected a mapping")
    out = dict(result)
    for o in objectives:
        value = out.get(o.name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"evaluate() returned {o.name}={value!r}; expected a finite number")
        out[o.name] = float(value)
    return out


class EvalWorker:
    """One worker: the problem with its heavy state, entered into the current round."""

    def __init__(self, config: Any, name: str, log_level: int) -> None:
        # Below --verbose the driver relays our records (`logs`): Ray's copy of our stderr stays off.
        configure(log_level, relay=log_level > logging.DEBUG)
        self.name = name
        self.problem = build_problem(config)
        self.objectives = tuple(self.problem.objectives)
        self._round: int | None = None
        self._trials = 0
        self._started = time.time()

    def info(self) -> dict[str, Any]:
        """Who this worker is and what it has done (the problem's own figures under `problem`)."""
        stats = getattr(self.problem, "worker_stats", None)
        return {"worker": self.name, "host": socket.gethostname(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "started_at": self._started,
                "trials": self._trials, "round": self._round, "problem": stats() if callable(stats) else {}}

    def enter_round(self, state: RoundState, inputs: list[ray.ObjectRef]) -> float:
        """Make `state` the current round (its inputs fetched from the object store); returns seconds."""
        t0 = time.perf_counter()
        self.problem.enter_round(state, ray.get(inputs[0]))
        self._round = state.round
        return time.perf_counter() - t0

    def evaluate(self, params: dict[str, int], state: RoundState, inputs: list[ray.ObjectRef]) -> dict[str, Any]:
        """Evaluate one trial; an exception in the problem becomes an ERROR outcome (never raised)."""
        if self._round != state.round:  # a worker that joined (or restarted) after the round began
            self.enter_round(state, inputs)
        self._trials += 1
        started = time.time()
        t0 = time.perf_counter()
        try:
            result = check_result(self.problem.evaluate(dict(params), state), self.objectives)
        except Exception as exc:
            return {"status": TrialStatus.ERROR.value, "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(), "result": None, "eval_s": time.perf_counter() - t0,
                    "started_at": started, "finished_at": time.time(), "worker": self.name}
        return {"status": TrialStatus.COMPLETE.value, "error": None, "traceback": None, "result": result,
                "eval_s": time.perf_counter() - t0, "started_at": started, "finished_at": time.time(),
                "worker": self.name}

    def logs(self) -> list[tuple[int, str]]:
        """This worker's log records since the last call: (level, message)."""
        return drain()

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        """`problem.<method>(*args)` on this worker's problem (between-round work)."""
        try:
            return getattr(self.problem, method)(*args)
        finally:
            self._round = None  # the call may have moved the problem to another round: re-enter before a trial


HOLD_BARRIER_S = 60.0  # the longest the first gap's holds wait for every forwarder to start


class WorkerPool:
    """Async dispatcher: each request awaits a free worker, runs there, and frees it (even on error)."""

    def __init__(self) -> None:
        self._free: asyncio.Queue[Any] = asyncio.Queue()
        self._alive: dict[str, Any] = {}
        self._dead: dict[str, str] = {}
        self._state: RoundState | None = None
        self._inputs: list[ray.ObjectRef] | None = None
        # Hold trials (efficientllava.search.session): every gate up to `_opened` is open; `_tokens[g]` holds
        # of gate g may return before that, one each (the session releases them one at a time).
        self._opened = -1
        self._tokens: dict[int, int] = {}
        self._arrived: dict[int, int] = {}
        self._forwarders = 0  # the first gap's holds wait until this many have arrived (see `hold`)
        self._gate_changed = asyncio.Condition()

    async def expect_forwarders(self, count: int) -> None:
        """How many holds the first gap has (one per forwarder): they return only once all of them are here."""
        async with self._gate_changed:
            self._forwarders = count
            self._gate_changed.notify_all()

    async def hold(self, gate: int) -> None:
        """Return once gate `gate` is open or one of its releases is free (a hold trial waits here).

        In the first gap (gate 0) a release is taken only once every forwarder is here: otherwise the first
        forwarder up would run the holds still waiting for theirs, one after another, and Tune would stop
        those actors as they come up (then start new ones for the next trials). A minute is the limit.
        """
        waited = time.monotonic()
        async with self._gate_changed:
            self._arrived[gate] = self._arrived.get(gate, 0) + 1
            self._gate_changed.notify_all()

            def free() -> bool:
                everyone = (gate > 0 or self._arrived.get(0, 0) >= self._forwarders
                            or time.monotonic() - waited > HOLD_BARRIER_S)
                return gate <= self._opened or (self._tokens.get(gate, 0) > 0 and everyone)

            while not free():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gate_changed.wait(), timeout=1.0)
            if gate > self._opened:
                self._tokens[gate] -= 1

    async def release(self, gate: int) -> None:
        """Let one hold of gate `gate` return (now, or when it arrives)."""
        async with self._gate_changed:
            self._tokens[gate] = self._tokens.get(gate, 0) + 1
            self._gate_changed.notify_all()

    async def open_gate(self, gate: int) -> None:
        """Open every gate up to `gate`: all their hold trials return."""
        async with self._gate_changed:
            self._opened = max(self._opened, gate)
            self._tokens = {g: n for g, n in self._tokens.items() if g > gate}
            self._gate_changed.notify_all()

    async def add(self, name: str, worker: Any) -> None:
        """Take `worker` into the pool once it has started (it may wait for resources)."""
        try:
            await worker.info.remote()
        except Exception as exc:  # noqa: BLE001 - a worker that cannot start is reported, not fatal
            self._dead[name] = f"{type(exc).__name__}: {exc}"
            return
        self._alive[name] = worker
        self._free.put_nowait((name, worker))

    def status(self) -> dict[str, Any]:
        """Workers in the pool, free now, and those that died (with why)."""
        return {"alive": sorted(self._alive), "free": self._free.qsize(), "dead": dict(self._dead)}

    def where(self) -> tuple[str, int]:
        """(node id, pid) of the pool actor."""
        return ray.get_runtime_context().get_node_id(), os.getpid()

    async def enter_round(self, state: RoundState, inputs: list[ray.ObjectRef]) -> dict[str, float]:
        """Make `state` current: every live worker enters it now; later ones on their first trial."""
        self._state, self._inputs = state, inputs
        names = list(self._alive)
        done = await asyncio.gather(*(self._alive[n].enter_round.remote(state, inputs) for n in names),
                                    return_exceptions=True)
        out: dict[str, float] = {}
        for name, value in zip(names, done, strict=True):
            if isinstance(value, ray.exceptions.RayActorError):
                self._drop(name, value)
            elif isinstance(value, BaseException):
                raise value
            else:
                out[name] = value
        return out

    def _drop(self, name: str, exc: BaseException) -> None:
        """Forget a worker that died."""
        self._alive.pop(name, None)
        self._dead[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    async def _acquire(self) -> tuple[str, Any]:
        if not self._alive and self._free.empty():
            raise EfficientLLaVAError(f"no live evaluation worker (died: {self._dead})")
        return await self._free.get()

    @contextlib.asynccontextmanager
    async def _worker(self) -> AsyncIterator[Any]:
        """A free worker for the duration of the block: dropped if it died, else handed back."""
        name, worker = await self._acquire()
        try:
            yield worker
        except ray.exceptions.RayActorError as exc:
            self._drop(name, exc)
            raise
        finally:
            if name in self._alive:
                self._free.put_nowait((name, worker))

    async def evaluate(self, params: dict[str, int], round_: int) -> dict[str, Any]:
        """Run one trial of the current round on the next free worker."""
        if self._state is None or self._state.round != round_ or self._inputs is None:
            raise RuntimeError(f"trial of round {round_} but the pool is in round "
                               f"{None if self._state is None else self._state.round}")
        async with self._worker() as worker:
            return await worker.evaluate.remote(params, self._state, self._inputs)

    async def call(self, method: str, args: tuple[Any, ...]) -> Any:
        """Run `problem.<method>(*args)` on the next free worker (after it entered the current round)."""
        async with self._worker() as worker:
            if self._state is not None and self._inputs is not None:
                await worker.enter_round.remote(self._state, self._inputs)
            return await worker.call.remote(method, args)

    async def infos(self) -> list[dict[str, Any]]:
        """`EvalWorker.info` of every live worker."""
        return list(await asyncio.gather(*(w.info.remote() for w in self._alive.values())))

    async def logs(self) -> list[tuple[int, str]]:
        """Every live worker's log records since the last call (a dead worker's are lost with it)."""
        got = await asyncio.gather(*(w.logs.remote() for w in self._alive.values()), return_exceptions=True)
        return [rec for recs in got if not isinstance(recs, BaseException) for rec in recs]


class Workers:
    """The driver's handle on the pool and its workers for one search (a context manager)."""

    def __init__(self, config: Any, experiment: str, count: int, problem_cpu: float, problem_gpu: float) -> None:
        self.config, self.experiment, self.count = config, experiment, count
        self.cpu, self.gpu = problem_cpu, problem_gpu
        self.pool: Any = None
        self._workers: list[Any] = []
        self._inputs: ray.ObjectRef | None = None

    def __enter__(self) -> Workers:
        """Start the pool and the workers (workers join the pool as they start)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        self.pool = ray.remote(WorkerPool).options(
            name=f"efficientllava-pool-{self.experiment}", namespace=NAMESPACE, num_cpus=0, max_restarts=0,
            max_concurrency=1000, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        ).remote()
        level = current_level()
        worker_cls = ray.remote(EvalWorker)
        for i in range(self.count):
            name = f"w{i}"
            handle = worker_cls.options(num_cpus=self.cpu, num_gpus=self.gpu, max_restarts=0,
                                        name=f"efficientllava-worker-{self.experiment}-{i}",
                                        namespace=NAMESPACE).remote(self.config, name, level)
            self._workers.append(handle)
            self.pool.add.remote(name, handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        """Stop every actor of the search: killed (no graceful-exit tracebacks), and on this node waited for,
        so nothing of the search outlives it."""
        here = ray.get_runtime_context().get_node_id()
        local: list[int] = []
        self.relay_logs(timeout_s=10.0 if exc[0] is None else 1.0)  # interrupted: do not wait on busy workers
        try:
            places = [tuple(ray.get(self.pool.where.remote(), timeout=10))]
            places += [(i["node_id"], i["pid"]) for i in ray.get(self.pool.infos.remote(), timeout=10)]
            local = [pid for node, pid in places if node == here]
        except Exception:  # noqa: BLE001 - a pool that is already gone has nothing to wait for
            pass
        for handle in [*self._workers, self.pool]:
            if handle is not None:
                ray.kill(handle, no_restart=True)
        self._workers, self.pool = [], None
        deadline = time.time() + 10
        while local and time.time() < deadline:
            local = [pid for pid in local if _alive(pid)]
            time.sleep(0.02)

    def placeable(self) -> int:
        """How many workers the cluster can hold at once (by its total CPUs and GPUs)."""
        total = ray.cluster_resources()
        fit = self.count
        for want, have in ((self.cpu, total.get("CPU", 0.0)), (self.gpu, total.get("GPU", 0.0))):
            if want > 0:
                fit = min(fit, int(have / want + 1e-9))
        return max(1, fit)

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until every worker the cluster can place has joined the pool (the rest join later)."""
        want = self.placeable()
        deadline = time.time() + timeout_s
        while True:
            status = ray.get(self.pool.status.remote())
            if status["alive"] and len(status["alive"]) >= want - len(status["dead"]):
                return
            if len(status["dead"]) == self.count:
                raise EfficientLLaVAError(f"no evaluation worker could start: {status['dead']}")
            if time.time() > deadline:
                if status["alive"]:
                    return
                raise EfficientLLaVAError(
                    f"no evaluation worker started within {timeout_s:.0f}s: the Ray cluster cannot place one "
                    f"with resources cpu={self.cpu:g}, gpu={self.gpu:g}"
                )
            time.sleep(0.02)

    def enter_round(self, state: RoundState, inputs: Any) -> dict[str, float]:
        """Send the round's inputs (once, through the object store) and let every worker enter it."""
        self.wait_ready()
        self._inputs = ray.put(inputs)
        try:
            return dict(_get(self.pool.enter_round.remote(state, [self._inputs])))
        finally:
            self.relay_logs()

    def call(self, method: str, *args: Any) -> Any:
        """`problem.<method>(*args)` on one worker (of the current round, if one was entered)."""
        self.wait_ready()
        try:
            return _get(self.pool.call.remote(method, args))
        finally:
            self.relay_logs()

    def relay_logs(self, timeout_s: float = 10.0) -> None:
        """Log the workers' records here (best effort: a pool that is gone or busy past `timeout_s` has none)."""
        if self.pool is None:
            return
        try:
            records = ray.get(self.pool.logs.remote(), timeout=timeout_s)
        except Exception:  # noqa: BLE001 - log relay must never fail a search
            return
        replay(records)

    def status(self) -> dict[str, Any]:
        """The pool's live / free / dead workers."""
        return dict(ray.get(self.pool.status.remote()))

    def infos(self) -> list[dict[str, Any]]:
        """Each live worker's `info()`."""
        return list(ray.get(self.pool.infos.remote()))
