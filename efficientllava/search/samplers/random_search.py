"""Uniform random sampling: the baseline every sampler should beat."""

from __future__ import annotations

from typing import Any

import optuna

from efficientllava.search.api import Space
from efficientllava.search.samplers import register_sampler


@register_sampler("random")
def random_sampler(search: Any, seed: int, space: Space) -> optuna.samplers.BaseSampler:
    """Each parameter drawn uniformly and independently."""
    return optuna.samplers.RandomSampler(seed=seed)
