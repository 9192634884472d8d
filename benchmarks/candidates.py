"""What the benchmarks share: random budget-feasible policies, and a mean +- std figure."""

from __future__ import annotations

import random
import statistics

from efficientllava.policy import PruningPolicy
from efficientllava.space import SearchSpace, repair


def draw(
    space: SearchSpace, units: list[str], weights: dict[str, int], k: int, seed: int
) -> list[PruningPolicy]:
    """K random level choices per unit, repaired onto the budget, de-duplicated (first kept)."""
    rng = random.Random(seed)
    seen: dict[str, PruningPolicy] = {}
    for _ in range(k):
        raw = PruningPolicy(tuple((u, rng.choice(space.levels_for(u))) for u in units))
        policy = repair(raw, space, weights)
        seen.setdefault(policy.key, policy)
    return list(seen.values())


def mean_std(values: list[float]) -> str:
    """'mean +- std' (sample std over seeds)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} +- {sd:.4f}"
