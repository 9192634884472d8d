"""Tree-structured Parzen estimator: the default sampler."""

from __future__ import annotations

from typing import Any

import optuna

from efficientllava.search.api import Space
from efficientllava.search.samplers import register_sampler


@register_sampler("tpe")
def tpe(search: Any, seed: int, space: Space) -> optuna.samplers.BaseSampler:
    """Multivariate TPE; constant liar, so trials in flight at once are not sampled alike."""
    return optuna.samplers.TPESampler(multivariate=True, constant_liar=True,
                                      n_startup_trials=search.n_startup_trials, seed=seed)
