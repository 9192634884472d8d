"""CMA-ES (Hansen 2016): a covariance-adapting evolution strategy over the integer parameters."""

from __future__ import annotations

from typing import Any

import optuna

from efficientllava.search.api import Space
from efficientllava.search.samplers import register_sampler


@register_sampler("cmaes", requires=("cmaes",))
def cmaes(search: Any, seed: int, space: Space) -> optuna.samplers.BaseSampler:
    """Optuna's CmaEsSampler; random for the first n_startup_trials trials."""
    return optuna.samplers.CmaEsSampler(n_startup_trials=search.n_startup_trials, seed=seed,
                                        warn_independent_sampling=False)
