"""The Ray Tune trial: a thin forwarder that sends its params to the worker pool and reports the outcome.

It holds no problem state and imports no model code (no torch), so Tune's trial actors start fast
and need almost no resources: the evaluation runs on a long-lived worker (`efficientllava.search.workers`).
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import ray
from ray import tune
from ray.tune.utils.util import flatten_dict

from efficientllava.search.api import METRIC, Objective, TrialStatus

# Extra config keys the searcher adds next to the sampled params (efficientllava.search.study).
NUMBER_KEY = "_number"
RETRY_KEY = "_retry_of"
SEED_KEY = "_seed"
# Keys the session's searcher adds (efficientllava.search.session): the trial's round, or, instead of
# params, the gate a hold trial waits at.
ROUND_KEY = "_round"
HOLD_KEY = "_hold"

def forwarder_resources(slots: int) -> dict[str, float]:
    """What one forwarder reserves: a `1/(slots + 1/2)` share of this node's `node:<ip>` resource.

    Tune refuses a trial with no resources, and a forwarder only waits, so it takes no CPU or GPU
    (they stay with the workers). The share matters: Tune starts a new actor for each new trial
    before it hands the trial a cached one (then discards the new actor); if that actor can start
    at once, every trial costs a Python process start (seconds of CPU). With this share at most
    `slots` forwarders fit, so the extra actor stays pending until it is discarded. It also keeps
    the forwarders beside the driver.
    """
    import ray

    here = ray.get_runtime_context().get_node_id()
    ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == here), None)
    key = f"node:{ip}"
    if ip is None or key not in ray.cluster_resources():
        return {"cpu": 0.0, "memory": float(2**20)}  # no node resource to share: a sliver of memory
    return {"cpu": 0.0, key: 1.0 / (slots + 0.5)}


def split_config(config: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """(sampled params, engine tags: number, retry_of, seed, round; or hold) of a Tune trial config."""
    if HOLD_KEY in config:
        return {}, {"hold": int(config[HOLD_KEY])}
    flat = flatten_dict(dict(config), delimiter="/")  # OptunaSearch un-flattens "a/b" param names
    tags = {"number": int(flat.pop(NUMBER_KEY)), "retry_of": flat.pop(RETRY_KEY, None),
            "seed": flat.pop(SEED_KEY, None), "round": int(flat.pop(ROUND_KEY))}
    return {k: int(v) for k, v in flat.items()}, tags


def hold_result(objectives: tuple[Objective, ...]) -> dict[str, Any]:
    """A hold trial's result: every objective NaN (Tune checks that the metric keys exist), marked as a hold."""
    metrics = {o.name: math.nan for o in objectives}
    metrics.setdefault(METRIC, math.nan)
    return {**metrics, HOLD_KEY: True, "done": True}


class ForwardTrainable(tune.Trainable):
    """One trial = one evaluation on a free worker of the pool; the actor is reused across trials and rounds.

    A hold trial (no params) waits at the pool's gate instead, so the forwarder stays alive while the
    driver works between rounds.

    Tune's result: the worker's outcome under `outcome`, plus every objective at the top level for
    the searcher (NaN for an errored trial, which the searcher tells as failed) and `status`.
    """

    def setup(self, config: dict[str, Any], pool: Any = None, objectives: tuple[Objective, ...] = ()) -> None:
        """Keep the pool handle and take the first trial's config."""
        if pool is None:
            raise ValueError("ForwardTrainable needs the worker pool (use make_trainable)")
        _exit_quietly_on_sigterm()
        self._started = time.time()
        self._pool, self._objectives = pool, objectives
        self._params, self._tags = split_config(config)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """Reuse this forwarder for the next trial."""
        self._params, self._tags = split_config(new_config)
        return True

    def step(self) -> dict[str, Any]:
        """Evaluate the trial's params on a worker (or wait at the gate for a hold); one step, then done."""
        if "hold" in self._tags:
            ray.get(self._pool.hold.remote(self._tags["hold"]))
            return hold_result(self._objectives)
        sent = time.time()
        outcome = ray.get(self._pool.evaluate.remote(self._params, self._tags["round"]))
        outcome["submitted_at"], outcome["returned_at"] = sent, time.time()  # this actor's clock: wall_s
        outcome["forwarder_started_at"] = self._started
        result = outcome.get("result") or {}
        metrics = {o.name: result.get(o.name, math.nan) for o in self._objectives}
        metrics.setdefault(METRIC, result.get(METRIC, math.nan))
        return {**metrics, "status": outcome["status"], "outcome": outcome, "params": self._params,
                "tags": self._tags, "done": True}

    def cleanup(self) -> None:
        """Drop the pool handle now, not in a finaliser that a SIGTERM could interrupt."""
        self._pool = None

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """No checkpoints: a trial is one evaluation."""
        return None

    def load_checkpoint(self, checkpoint: Any) -> None:
        """No checkpoints: a trial is one evaluation."""
        return None


def _exit_quietly_on_sigterm() -> None:
    """End this forwarder at once on SIGTERM (how Ray stops actors at the end of a Tuner or a search).

    Ray's own handler raises SystemExit wherever the interpreter is, and when that is inside a
    finaliser (an ActorHandle's `__del__`) Python prints "Exception ignored ... SystemExit" with a
    traceback. A forwarder holds nothing to flush, so it exits without unwinding.
    """
    try:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    except ValueError:  # not the main thread: keep Ray's handler
        pass


def make_trainable(pool: Any, objectives: tuple[Objective, ...], slots: int) -> Any:
    """The Tune trainable of a search: the pool bound, resources for `slots` forwarders at once."""
    bound = tune.with_parameters(ForwardTrainable, pool=pool, objectives=objectives)
    return tune.with_resources(bound, forwarder_resources(slots))


__all__ = ["ForwardTrainable", "TrialStatus", "hold_result", "make_trainable", "split_config"]
