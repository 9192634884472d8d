"""What the benchmarks share: random budget-feasible policies, and a mean +- std figure."""

from __future__ import annotations

import dataclasses
import random
import statistics

from efficientllava.config import ExperimentConfig
from efficientllava.pipeline import Pipeline, open_pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.problem import resolved_space
from efficientllava.space import SearchSpace, fit_to_budget, load_space


def seed_pipeline(cfg: ExperimentConfig, seed: int, shots: int, heldout_size: int) -> tuple[Pipeline, SearchSpace]:
    """The experiment's model with the few-shot draw `seed`, and its space resolved for the model's layers."""
    data = dataclasses.replace(cfg.data, n_shots=shots, seed=seed, heldout_size=heldout_size)
    pipe = open_pipeline(cfg.model, data, cfg.eval.batch_size)
    return pipe, resolved_space(load_space(cfg.space), pipe.num_layers)


def draw(
    space: SearchSpace, units: list[str], weights: dict[str, int], k: int, seed: int
) -> list[PruningPolicy]:
    """K random level choices per unit, fitted to the budget as trials are (projected by default), de-duplicated."""
    rng = random.Random(seed)
    seen: dict[str, PruningPolicy] = {}
    for _ in range(k):
        raw = PruningPolicy(tuple((u, rng.choice(space.levels_for(u))) for u in units))
        policy = fit_to_budget(raw, space, weights)
        seen.setdefault(policy.key, policy)
    return list(seen.values())


def mean_std(values: list[float]) -> str:
    """'mean +- std' (sample std over seeds)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} +- {sd:.4f}"
