"""A toy SearchProblem for smoke tests of the search machinery (no model, no data).

`problem: efficientllava.search.toy:QuadraticProblem` with a space YAML such as

    params: {x_0: [0, 9], x_1: [0, 9]}   # integer parameters and their inclusive ranges
    target: 3                            # objective = -sum((x_i - target)^2), best 0
    sleep_s: 0.0                         # seconds each evaluation sleeps (to time Ray's overhead)
    fail_when: {x_0: [0, 1]}             # optional: evaluate raises when every listed param has a listed value

After each round the ranges narrow to +-`evolution.margin`+1 around the round's best trial.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml

from efficientllava.config import ExperimentConfig
from efficientllava.errors import ConfigError
from efficientllava.experiment import ExperimentDir
from efficientllava.search.problem import METRIC, RoundState


class ToyEvaluationError(RuntimeError):
    """Raised by the toy for parameters listed under `fail_when`."""


class QuadraticProblem:
    """Integer params, objective = -sum((x_i - target)^2); an `after_round` that narrows the ranges."""

    def __init__(self, config: ExperimentConfig, experiment_dir: str | Path) -> None:
        self.config = config
        self.exp = ExperimentDir(experiment_dir)
        self._spaces: dict[str, dict[str, Any]] = {}

    def _space(self, path: str) -> dict[str, Any]:
        """The parsed space YAML (cached per path)."""
        if path not in self._spaces:
            d = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(d.get("params"), dict) or not d["params"]:
                raise ConfigError(f"{path}: the toy space needs `params: {{name: [low, high], ...}}`")
            self._spaces[path] = d
        return self._spaces[path]

    def define_space(self, trial: optuna.Trial, state: RoundState) -> None:
        """Suggest each integer parameter within its range."""
        for name, (low, high) in self._space(state.space_path)["params"].items():
            trial.suggest_int(name, int(low), int(high))

    def evaluate(self, params: dict[str, Any], state: RoundState) -> dict[str, Any]:
        """Score params; sleeps `sleep_s` and raises for `fail_when` matches."""
        space = self._space(state.space_path)
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
        }

    def initial_state(self) -> RoundState:
        """Round 0: copy the configured space into the experiment's spaces/ folder."""
        self.exp.spaces_dir.mkdir(parents=True, exist_ok=True)
        path = self.exp.spaces_dir / "round-0.yaml"
        shutil.copyfile(self.config.space, path)
        return RoundState(round=0, projector_version=0, projector_path=None, space_path=str(path))

    def after_round(self, state: RoundState, trials: pd.DataFrame) -> RoundState:
        """Narrow every range around the best finished trial of this round."""
        space = dict(self._space(state.space_path))
        done = trials[(trials["round"] == state.round) & (trials["status"] == "COMPLETE")]
        if len(done):
            best = done.loc[done[METRIC].idxmax()]
            width = self.config.evolution.margin + 1
            space["params"] = {
                name: [max(int(lo), int(best[f"param/{name}"]) - width), min(int(hi), int(best[f"param/{name}"]) + width)]
                for name, (lo, hi) in space["params"].items()
            }
        path = self.exp.spaces_dir / f"round-{state.round + 1}.yaml"
        path.write_text(yaml.safe_dump(space, sort_keys=False))
        return RoundState(round=state.round + 1, projector_version=state.projector_version + 1,
                          projector_path=None, space_path=str(path))
