"""The seam between the search machinery (Ray Tune, Optuna, driver) and what is searched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import optuna
import pandas as pd


@dataclass(frozen=True)
class RoundState:
    """What a round's trials need to know: which round, which projector, which space."""

    round: int
    projector_version: int  # 0 = the checkpoint's own projector
    projector_path: str | None  # safetensors of projector weights, None for version 0
    space_path: str  # the (possibly evolved) search-space YAML for this round


class SearchProblem(Protocol):
    """A search problem: a space to sample, a scorer for trial actors, a between-rounds step.

    Implementations are constructed with `(config, experiment_dir)` in every process that needs
    one (the driver actor and each reused trial actor) and must be cheap to construct; heavy state
    (model, data, variant bank) is loaded lazily and cached per `RoundState`.
    """

    def define_space(self, trial: optuna.Trial, state: RoundState) -> None:
        """Suggest this round's parameters on `trial` (define-by-run)."""

    def evaluate(self, params: dict[str, Any], state: RoundState) -> dict[str, Any]:
        """Score sampled `params`: a flat dict with at least the objective metric and `policy/<unit>` ratios."""

    def initial_state(self) -> RoundState:
        """The state of round 0 (writes the initial space into the experiment directory)."""

    def after_round(self, state: RoundState, trials: pd.DataFrame) -> RoundState:
        """Between rounds: optimise the projector and evolve the space; return the next round's state."""


METRIC = "objective"  # the metric every problem reports and the search maximises
MODE = "max"
