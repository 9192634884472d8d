"""Gaussian-process Bayesian optimisation (Optuna's GPSampler, log expected improvement)."""

from __future__ import annotations

from typing import Any

import optuna

from efficientllava.search.api import Space
from efficientllava.search.samplers import register_sampler


@register_sampler("gp", requires=("scipy", "torch"))
def gp(search: Any, seed: int, space: Space) -> optuna.samplers.BaseSampler:
    """Optuna's GPSampler; random for the first n_startup_trials trials."""
    return optuna.samplers.GPSampler(n_startup_trials=search.n_startup_trials, seed=seed,
                                     warn_independent_sampling=False)
