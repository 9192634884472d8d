"""NSGA-II (Deb et al. 2002): a two-objective search of the problem's fidelity objective vs kept fraction.

The engine runs a study with both of the problem's objectives (`SearchProblem.objectives`:
maximise the objective, minimise the kept fraction) for samplers registered `multi_objective`;
best_policy.json still names the highest objective, and the report marks the Pareto set.
"""

from __future__ import annotations

from typing import Any

import optuna

from efficientllava.search.api import Space
from efficientllava.search.samplers import register_sampler


@register_sampler("nsga2", multi_objective=True)
def nsga2(search: Any, seed: int, space: Space) -> optuna.samplers.BaseSampler:
    """Optuna's NSGAIISampler; its first generation (population_size trials) is random, like n_startup_trials."""
    return optuna.samplers.NSGAIISampler(population_size=max(2, search.n_startup_trials), seed=seed)
