"""A toy SearchProblem for tests of the search machinery (no model, no data).

`problem: efficientllava.testing.toy:QuadraticProblem` with a space YAML such as

    params: {x_0: [0, 9], x_1: [0, 9]}   # integer parameters and their inclusive ranges
    target: 3                            # objective = -sum((x_i - target)^2), best 0
    sleep_s: 0.0                         # seconds each evaluation sleeps (to time the engine's overhead)
    setup_s: 0.0                         # seconds a worker's first round entry sleeps (a "model load")
    fail_when: {x_0: [0, 1]}             # optional: evaluate raises when every listed param has a listed value
    weights: {x_0: 2}                    # optional: per-param budget weights (default 1)
    budget: {target: 4, tolerance: 0}    # optional: a budget on the weighted mean of the params
    seeds: {centre: {x_0: 4, x_1: 4}}    # optional: named points round 0 evaluates first

After each round the ranges narrow to +-`evolution.margin`+1 around the round's best trial. Workers
get the round's space through `round_inputs` (the object store), never from the experiment directory.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import yaml

from efficientllava.atomic import write_text_atomic
from efficientllava.errors import ConfigError
from efficientllava.search.api import (
    ATTRIBUTION_PREFIX,
    DEFAULT_OBJECTIVES,
    METRIC,
    DriverContext,
    Objective,
    Param,
    RoundState,
    Space,
    SpaceBudget,
    TrialStatus,
)


class ToyEvaluationError(RuntimeError):
    """Raised by the toy for parameters listed under `fail_when`."""


class QuadraticProblem:
    """Integer params, objective = -sum((x_i - target)^2); an `after_round` that narrows the ranges."""

    objectives: tuple[Objective, ...] = DEFAULT_OBJECTIVES
    setups = 0  # first round entries in this process (the toy's stand-in for model loads)

    def __init__(self, config: Any) -> None:
        self.config = config
        self._space: dict[str, Any] | None = None  # worker side: the entered round's space
        self._round: int | None = None

    @staticmethod
    def check_config(config: Any) -> None:
        """Before Ray starts: the space YAML parses and has `params`."""
        try:
            d = yaml.safe_load(open(config.space).read()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{config.space}: cannot read the toy space ({str(exc).splitlines()[0]})") from None
        if not isinstance(d, dict) or not isinstance(d.get("params"), dict) or not d["params"]:
            raise ConfigError(f"{config.space}: the toy space needs `params: {{name: [low, high], ...}}`")

    # -- driver side ----------------------------------------------------------------------------

    def _read(self, state: RoundState, ctx: DriverContext) -> dict[str, Any]:
        """The round's parsed space YAML."""
        path = ctx.root / state.payload["space"]
        d = yaml.safe_load(path.read_text()) or {}
        if not isinstance(d.get("params"), dict) or not d["params"]:
            raise ConfigError(f"{path}: the toy space needs `params: {{name: [low, high], ...}}`")
        return d

    def initial_state(self, ctx: DriverContext) -> RoundState:
        """Round 0: copy the configured space into the experiment's spaces/ folder."""
        with open(self.config.space) as fh:
            text = fh.read()
        write_text_atomic(ctx.root / "spaces" / "round-0.yaml", text)
        return RoundState(0, {"space": "spaces/round-0.yaml"})

    def space(self, state: RoundState, ctx: DriverContext) -> Space:
        """Each parameter's range and weight, and the optional budget."""
        d = self._read(state, ctx)
        weights = d.get("weights") or {}
        params = tuple(Param(name, int(lo), int(hi), weight=float(weights.get(name, 1.0)))
                       for name, (lo, hi) in d["params"].items())
        budget = d.get("budget")
        return Space(params, SpaceBudget(float(budget["target"]), float(budget.get("tolerance", 0.0)))
                     if budget else None)

    def seed_points(self, state: RoundState, ctx: DriverContext) -> dict[str, dict[str, int]]:
        """The YAML's `seeds`, in round 0 only."""
        seeds = self._read(state, ctx).get("seeds") or {}
        return {str(k): {p: int(v) for p, v in point.items()} for k, point in seeds.items()} if state.round == 0 else {}

    def round_inputs(self, state: RoundState, ctx: DriverContext) -> dict[str, Any]:
        """The round's space, for the workers."""
        return self._read(state, ctx)

    def after_round(self, state: RoundState, trials: pd.DataFrame, ctx: DriverContext) -> RoundState:
        """Narrow every range around the best finished trial of this round."""
        space = self._read(state, ctx)
        done = trials[(trials["round"] == state.round) & (trials["status"] == TrialStatus.COMPLETE.value)]
        if len(done):
            best = done.loc[done[METRIC].idxmax()]
            width = self.config.evolution.margin + 1
            space["params"] = {
                name: [max(int(lo), int(best[f"param/{name}"]) - width), min(int(hi), int(best[f"param/{name}"]) + width)]
                for name, (lo, hi) in space["params"].items()
            }
        rel = f"spaces/round-{state.round + 1}.yaml"
        write_text_atomic(ctx.root / rel, yaml.safe_dump(space, sort_keys=False))
        return RoundState(state.round + 1, {"space": rel})

    def heldout(self, states: Sequence[RoundState], best: Mapping[str, Any],
                ctx: DriverContext) -> dict[str, dict[str, Any]] | None:
        """The toy has no held-out set."""
        return None

    # -- worker side ----------------------------------------------------------------------------

    def enter_round(self, state: RoundState, inputs: dict[str, Any]) -> None:
        """Take the round's space; the first entry in a process sleeps `setup_s` (a stand-in for a model load)."""
        if self._round is None:
            QuadraticProblem.setups += 1
            time.sleep(float(inputs.get("setup_s", 0.0)))
        self._space, self._round = inputs, state.round

    def worker_stats(self) -> dict[str, Any]:
        """First round entries in this worker's process."""
        return {"setups": QuadraticProblem.setups}

    def evaluate(self, params: Mapping[str, int], state: RoundState) -> dict[str, Any]:
        """Score params; sleeps `sleep_s` and raises for `fail_when` matches."""
        if self._space is None or self._round != state.round:
            raise RuntimeError(f"worker is not in round {state.round}; enter_round first")
        space = self._space
        time.sleep(float(space.get("sleep_s", 0.0)))
        fail = space.get("fail_when") or {}
        if fail and all(params.get(k) in (v if isinstance(v, list) else [v]) for k, v in fail.items()):
            raise ToyEvaluationError(f"toy failure for {fail}")
        target = float(space.get("target", 3))
        sq = sum((float(v) - target) ** 2 for v in params.values())
        highs = [float(h) for _, h in space["params"].values()]
        return {
            METRIC: -sq,
            "accuracy": 1.0 / (1.0 + sq),
            "gap": 0.0,
            "kept_fraction": sum(float(v) for v in params.values()) / max(1.0, sum(highs)),
            **{f"policy/{k}": float(v) for k, v in params.items()},
            # Each parameter's exact share of the loss (what the pruning problem estimates per unit).
            **{f"{ATTRIBUTION_PREFIX}{k}": (float(v) - target) ** 2 for k, v in params.items()},
        }
