"""The seam between the search engine and what it searches (a leaf module: it imports no other part of
the engine, so problems, samplers and the engine can all depend on it).

A search problem is a class named in the experiment YAML (`problem: package.module:Class`),
constructed as `Class(config)` on the driver and in every worker; construction must be cheap.
Its methods fall on two sides of the cluster:

- **Driver side** (where the experiment directory is; `ctx.root`): `initial_state`, `space`,
  `seed_points`, `round_inputs`, `after_round`, `heldout`. They may read and write files under
  `ctx.root`, and run heavy work on a worker with `ctx.call("method", *args)`, which calls
  `problem.method(*args)` on a worker that already holds the problem's heavy state (a model).
- **Worker side** (any node; never the experiment directory): `enter_round(state, inputs)`
  swaps in what a round needs (`inputs` = `round_inputs(state, ctx)`, shipped through Ray's
  object store), then `evaluate(params, state)` scores one sampled point.

A round's `RoundState` is owned by the problem: its `payload` is any JSON-able mapping, and paths
in it are relative to the experiment directory (so a moved directory still resumes).
"""

from __future__ import annotations

import enum
import importlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from efficientllava.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

METRIC = "objective"  # the scalar every problem reports and every search maximises
MODE = "max"
SIZE_METRIC = "kept_fraction"  # the second objective of multi-objective samplers (minimised)
POLICY_PREFIX = "policy/"  # result keys `policy/<unit>` name the policy a trial scored (best_policy.json)
# Result keys `attribution/<param>`: a trial's estimate of each parameter's share of the damage its point
# does (the pruning problem: each unit's share of the KL to the dense model). The engine stores them
# on the Optuna trial (user attr ATTRIBUTION_ATTR) for samplers that model the objective from them.
ATTRIBUTION_PREFIX = "attribution/"
ATTRIBUTION_ATTR = "attribution"


class TrialStatus(str, enum.Enum):
    """How a trial ended: the one definition of the statuses in records, tables and reports."""

    COMPLETE = "COMPLETE"
    ERROR = "ERROR"

    def __str__(self) -> str:
        return self.value


STATUSES = tuple(s.value for s in TrialStatus)


@dataclass(frozen=True)
class Objective:
    """A metric of `evaluate`'s result and its direction ("max" or "min")."""

    name: str
    mode: str

    def __post_init__(self) -> None:
        """Check the direction."""
        if self.mode not in ("max", "min"):
            raise ValueError(f"objective {self.name!r}: mode {self.mode!r} is not 'max' or 'min'")


# What a single-objective search maximises, then what multi-objective samplers trade it against.
DEFAULT_OBJECTIVES = (Objective(METRIC, MODE), Objective(SIZE_METRIC, "min"))


@dataclass(frozen=True)
class RoundState:
    """One round as its problem defines it: the round index and a JSON-able payload."""

    round: int
    payload: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the payload is JSON (it is stored in state.json and trial records)."""
        try:
            text = json.dumps(dict(self.payload), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"RoundState payload must be JSON-able: {exc}") from None
        object.__setattr__(self, "payload", json.loads(text))

    def to_json(self) -> dict[str, Any]:
        """The state as stored in state.json."""
        return {"round": self.round, "payload": dict(self.payload)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RoundState:
        """Read back `to_json`."""
        return cls(int(d["round"]), dict(d.get("payload") or {}))


@dataclass(frozen=True)
class Param:
    """One integer parameter chosen in [low, high]; value v means `levels[v - low]` (v itself without levels).

    `weight` is the parameter's share of the budget (a prunable unit's parameter count), so a
    budget-aware sampler can move mass between parameters without leaving the budget. `errors`, when
    known, is a damage estimate per value (a unit's reconstruction error at each level, 0 or more),
    the curve a model-based sampler scales by what trials measure.
    """

    name: str
    low: int
    high: int
    levels: tuple[float, ...] | None = None
    weight: float = 1.0
    errors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        """Validate the range, the levels and the weight."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a parameter needs a name, got {self.name!r}")
        if not (isinstance(self.low, int) and isinstance(self.high, int) and self.low <= self.high):
            raise ValueError(f"parameter {self.name}: need integers low <= high, got [{self.low}, {self.high}]")
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
            if len(self.levels) != self.high - self.low + 1:
                raise ValueError(f"parameter {self.name}: {len(self.levels)} levels for "
                                 f"{self.high - self.low + 1} values")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"parameter {self.name}: weight {self.weight!r} must be a number > 0")
        if self.errors is not None:
            object.__setattr__(self, "errors", tuple(float(v) for v in self.errors))
            if len(self.errors) != self.high - self.low + 1 or not all(
                    math.isfinite(v) and v >= 0 for v in self.errors):
                raise ValueError(f"parameter {self.name}: errors need one finite value >= 0 per value, got "
                                 f"{len(self.errors)} for {self.high - self.low + 1} values")

    @property
    def values(self) -> range:
        """Every value the parameter may take."""
        return range(self.low, self.high + 1)

    def level(self, value: int) -> float:
        """What `value` means (its level, or the value itself)."""
        if value not in self.values:
            raise ValueError(f"parameter {self.name}: value {value} is outside [{self.low}, {self.high}]")
        return float(value) if self.levels is None else self.levels[value - self.low]


@dataclass(frozen=True)
class SpaceBudget:
    """A constraint on the weight-averaged level: mean >= target - tolerance."""

    target: float
    tolerance: float = 0.0

    @property
    def floor(self) -> float:
        """The least weighted mean that meets the budget."""
        return self.target - self.tolerance

    def within(self, mean: float) -> bool:
        """Whether a weighted mean meets the budget."""
        return mean >= self.floor - 1e-9


@dataclass(frozen=True)
class Space:
    """A round's space as data: what samplers need (no define-by-run)."""

    params: tuple[Param, ...]
    budget: SpaceBudget | None = None

    def __post_init__(self) -> None:
        """Names must be unique and the space non-empty."""
        object.__setattr__(self, "params", tuple(self.params))
        names = [p.name for p in self.params]
        if not names:
            raise ValueError("a space needs at least one parameter")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names in a space: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names, in order."""
        return tuple(p.name for p in self.params)

    def __getitem__(self, name: str) -> Param:
        """The parameter called `name`."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def contains(self, params: Mapping[str, Any]) -> bool:
        """Whether `params` names exactly this space's parameters with values in range."""
        return set(params) == set(self.names) and all(
            isinstance(params[p.name], int) and params[p.name] in p.values for p in self.params)

    def weighted_mean(self, params: Mapping[str, int]) -> float:
        """The weight-averaged level of a point (what the budget constrains)."""
        total = sum(p.weight for p in self.params)
        return sum(p.weight * p.level(int(params[p.name])) for p in self.params) / total


class DriverContext(Protocol):
    """What the engine gives the driver-side methods of a problem."""

    @property
    def root(self) -> Path:
        """The experiment directory (it exists only where the driver runs)."""
        ...

    def call(self, method: str, *args: Any) -> Any:
        """Run `problem.<method>(*args)` on a worker that holds the problem's heavy state; its result."""
        ...


class LocalContext:
    """A `DriverContext` in one process: `call` runs on a given problem instance (tests, export)."""

    def __init__(self, root: str | Path, worker: Any = None) -> None:
        self._root, self.worker = Path(root), worker

    @property
    def root(self) -> Path:
        """The experiment directory."""
        return self._root

    def call(self, method: str, *args: Any) -> Any:
        """`worker.<method>(*args)` in this process."""
        if self.worker is None:
            raise RuntimeError(f"no worker to run {method!r} on in this context")
        return getattr(self.worker, method)(*args)


class SearchProblem(Protocol):
    """What the engine searches. See the module docstring for which side each method runs on."""

    objectives: tuple[Objective, ...]  # first: (METRIC, "max"); the rest for multi-objective samplers

    def initial_state(self, ctx: DriverContext) -> RoundState:
        """Round 0's state (may write files under `ctx.root`)."""
        ...

    def space(self, state: RoundState, ctx: DriverContext) -> Space:
        """The round's space as data."""
        ...

    def seed_points(self, state: RoundState, ctx: DriverContext) -> Mapping[str, Mapping[str, int]]:
        """Named points evaluated first in the round (e.g. a uniform baseline); may be empty."""
        ...

    def round_inputs(self, state: RoundState, ctx: DriverContext) -> Any:
        """Picklable data every worker needs for the round (read from `ctx.root`; shipped by Ray)."""
        ...

    def enter_round(self, state: RoundState, inputs: Any) -> None:
        """Worker side: make the round's `inputs` current (loading heavy state once per worker)."""
        ...

    def evaluate(self, params: Mapping[str, int], state: RoundState) -> Mapping[str, Any]:
        """Worker side: score one point; a flat mapping with a finite METRIC and every objective."""
        ...

    def after_round(self, state: RoundState, trials: pd.DataFrame, ctx: DriverContext) -> RoundState:
        """Between rounds: the next round's state (round + 1) from this round's trial table."""
        ...

    def heldout(self, states: Sequence[RoundState], best: Mapping[str, Any],
                ctx: DriverContext) -> Mapping[str, Mapping[str, Any]] | None:
        """After the search: a held-out comparison `{name: {figure: value}}`, or None."""
        ...


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


def build_problem(config: Any) -> SearchProblem:
    """Construct the configured problem as `Class(config)`."""
    problem: SearchProblem = load_problem_class(config.problem)(config)
    return problem
