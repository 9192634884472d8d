"""Search-space evolution: narrow each unit's levels to a window around what the top policies chose.

Rule: for each unit, take the indices (in the unit's current level list) of the levels the
top-k policies gave it, and keep the levels from `min index - margin` to `max index + margin`,
clipped to the list. Level 0 (dense) is treated like any other level: it is dropped only when
it falls outside the window. This re-centres the next round on the best region found so far,
so TPE spends its trial budget there instead of re-exploring levels no good policy used.

A narrowed space must still be able to meet the budget (every unit at its highest level must
reach it, the condition `space.repair` needs). When it cannot, every unit's upper end is widened
back by one level at a time (clipped to its old list), the same uniform step `repair` uses,
until it can.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.units import unit_sort_key
from efficientllava.space import SearchSpace, budget_status

_EPS = 1e-6  # a policy ratio matches a level within this tolerance


def _level_index(unit: str, ratio: float, levels: tuple[float, ...]) -> int:
    """Index of `ratio` in `levels`; PolicyError when it is not one of them."""
    for i, level in enumerate(levels):
        if abs(level - ratio) < _EPS:
            return i
    allowed = ", ".join(f"{lv:g}" for lv in levels)
    raise PolicyError(
        f"top policy gives {unit} ratio {ratio:g}, which is not one of its levels ({allowed}); "
        "evolve the space the policies were sampled from"
    )


def _top_levels(
    windows: Mapping[str, tuple[int, int]], old: Mapping[str, tuple[float, ...]]
) -> PruningPolicy:
    """The policy with every unit at the highest level of its window."""
    return PruningPolicy(tuple((u, old[u][hi]) for u, (_, hi) in windows.items()))


def evolve_space(
    space: SearchSpace, top_policies: Sequence[PruningPolicy], margin: int, weights: Mapping[str, int]
) -> SearchSpace:
    """The next round's space: each unit's levels narrowed to the top policies' range +- `margin` levels.

    `weights` gives each unit's parameter count (for the budget check). Units the policies do not
    name keep their levels. Raises PolicyError when even the unnarrowed space cannot reach its budget.
    """
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ConfigError(f"evolution.margin {margin!r} must be an integer >= 0")
    if not top_policies:
        raise ConfigError("search-space evolution needs at least one top policy; got none")
    units = list(dict.fromkeys(u for p in top_policies for u in p.units))
    old = {u: space.levels_for(u) for u in units}
    windows: dict[str, tuple[int, int]] = {}
    for unit in units:
        chosen = [_level_index(unit, p.ratio(unit), old[unit]) for p in top_policies if unit in p.units]
        windows[unit] = (max(0, min(chosen) - margin), min(len(old[unit]) - 1, max(chosen) + margin))
    # Widen the upper ends uniformly until the highest-level policy meets the budget.
    while not budget_status(_top_levels(windows, old), space.budget, weights)[1]:
        if all(hi == len(old[u]) - 1 for u, (_, hi) in windows.items()):
            mean = budget_status(_top_levels(windows, old), space.budget, weights)[0]
            raise PolicyError(
                f"search space {space.name!r} cannot meet its budget even before evolution: with every unit at "
                f"its highest level the mean sparsity is {mean:.4f} < {space.budget.floor:.4f}; "
                "add higher levels or lower budget.target"
            )
        windows = {u: (lo, min(hi + 1, len(old[u]) - 1)) for u, (lo, hi) in windows.items()}
    return space.with_unit_levels({u: old[u][lo : hi + 1] for u, (lo, hi) in windows.items()})


def _fmt(levels: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{lv:g}" for lv in levels) + "]"


def describe_evolution(old: SearchSpace, new: SearchSpace) -> str:
    """One line per unit whose levels changed, `layer.3: [0, 0.1, 0.2] -> [0.1, 0.2]`; "" when none did."""
    units = sorted({u for u, _ in old.unit_levels} | {u for u, _ in new.unit_levels}, key=unit_sort_key)
    lines = [
        f"{u}: {_fmt(old.levels_for(u))} -> {_fmt(new.levels_for(u))}"
        for u in units
        if old.levels_for(u) != new.levels_for(u)
    ]
    return "\n".join(lines)
