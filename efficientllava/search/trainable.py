"""The Ray Tune trial: a reusable actor that holds the problem and evaluates one policy per trial."""

from __future__ import annotations

import importlib
import math
import numbers
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.utils.util import flatten_dict

from efficientllava.config import ExperimentConfig
from efficientllava.errors import ConfigError
from efficientllava.experiment import ExperimentDir, write_json_atomic
from efficientllava.search.problem import METRIC, RoundState, SearchProblem
from efficientllava.search.study import NUMBER_KEY, RETRY_KEY, STATUS_ERROR, STATUS_OK


def load_problem_class(spec: str) -> type:
    """Import the `module:Class` named by the config's `problem:` key."""
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"problem={spec!r}: cannot import module {module_name!r} ({exc})") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"problem={spec!r}: module {module_name!r} has no class {class_name!r}")
    return cls


def build_problem(cfg: ExperimentConfig, experiment_root: str | Path) -> SearchProblem:
    """Construct the configured problem as `Class(config, experiment_dir)`."""
    return load_problem_class(cfg.problem)(cfg, Path(experiment_root))


def trial_record(*, state: RoundState, number: int, trial_id: str, params: dict[str, Any],
                 result: dict[str, Any] | None, error: str | None, started: float, eval_s: float,
                 retry_of: int | None) -> dict[str, Any]:
    """The JSON written for one finished trial (see `efficientllava.trials` for the table built from it)."""
    finished = time.time()
    result = dict(result or {})
    objective = result.get(METRIC)
    return {
        "round": state.round,
        "number": number,
        "trial_id": trial_id,
        "status": STATUS_OK if error is None else STATUS_ERROR,
        "error": error,
        "objective": objective,
        "params": params,
        "policy": {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("policy/")},
        "result": result,
        "projector_version": state.projector_version,
        "projector_path": state.projector_path,
        "space_path": state.space_path,
        "retry_of": retry_of,
        "eval_s": eval_s,
        "wall_s": finished - started,
        "started_at": started,
        "finished_at": finished,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


class PolicyTrainable(tune.Trainable):
    """One trial = one `problem.evaluate(params, state)`; the actor (and its problem) is reused across trials.

    Tune's result is the problem's dict plus `eval_s`, `round`, `number` and `done` (set here).
    """

    def setup(self, config: dict[str, Any], cfg: ExperimentConfig | None = None, experiment_root: str = "",
              state: RoundState | None = None) -> None:
        """Build the problem once per actor and take the first trial's config."""
        if cfg is None or state is None:
            raise ValueError("PolicyTrainable needs cfg, experiment_root and state (use make_trainable)")
        t0 = time.time()
        self._cfg, self._state = cfg, state
        self._exp = ExperimentDir(experiment_root)
        self._actor = {"actor_started_at": t0, "actor_setup_s": 0.0, "actor_trials": 0}
        self._begin(config)
        try:
            self._problem = build_problem(cfg, experiment_root)
        except Exception as exc:  # recorded like an evaluation error, so the round accounts for it
            self._write(None, f"{type(exc).__name__}: {exc}", 0.0, traceback.format_exc())
            raise
        self._actor["actor_setup_s"] = time.time() - t0

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """Reuse this actor (and its loaded problem) for the next trial."""
        self._begin(new_config)
        return True

    def _begin(self, config: dict[str, Any]) -> None:
        """Take a new trial's config apart: the sampled params and the machinery's keys."""
        self._started = time.time()
        self._actor["actor_trials"] += 1
        flat = flatten_dict(dict(config), delimiter="/")  # OptunaSearch un-flattens "a/b" param names
        self._number = int(flat.pop(NUMBER_KEY))
        retry = flat.pop(RETRY_KEY, None)
        self._retry_of = None if retry is None else int(retry)
        self._params = flat

    def step(self) -> dict[str, Any]:
        """Evaluate the trial's params once; the JSON is on disk before the result goes to Tune."""
        t0 = time.time()
        try:
            result = self._problem.evaluate(dict(self._params), self._state)
            _check_result(result)
            result = {**result, METRIC: float(result[METRIC])}
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            self._write(None, message, time.time() - t0, traceback.format_exc())
            raise
        eval_s = time.time() - t0
        self._write(result, None, eval_s)
        return {**result, "eval_s": eval_s, "round": self._state.round, "number": self._number, "done": True}

    def _write(self, result: dict[str, Any] | None, error: str | None, eval_s: float, tb: str | None = None) -> None:
        """Write this trial's JSON atomically before Tune hears of the outcome (so a kill loses nothing)."""
        rec = trial_record(state=self._state, number=self._number, trial_id=self.trial_id, params=self._params,
                           result=result, error=error, started=self._started, eval_s=eval_s, retry_of=self._retry_of)
        rec.update(self._actor)  # actor_trials == 1: this trial paid for the actor's setup
        if tb:
            rec["traceback"] = tb[-4000:]
        write_json_atomic(self._exp.trial_path(self._state.round, self._number), rec)

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """No checkpoints: a trial is one evaluation."""
        return None  # one-step trials: nothing to checkpoint

    def load_checkpoint(self, checkpoint: Any) -> None:
        """No checkpoints: a trial is one evaluation."""
        return None


def _check_result(result: Any) -> None:
    """A problem's result must be a flat mapping with a finite numeric objective."""
    if not isinstance(result, dict):
        raise TypeError(f"evaluate() returned {type(result).__name__}, expected a dict")
    value = result.get(METRIC)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"evaluate() returned {METRIC}={value!r}; expected a finite number")


def make_trainable(cfg: ExperimentConfig, exp: ExperimentDir, state: RoundState) -> Any:
    """The Tune trainable for one round: parameters bound, per-trial resources from the config."""
    bound = tune.with_parameters(PolicyTrainable, cfg=cfg, experiment_root=str(exp.root), state=state)
    return tune.with_resources(bound, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})

