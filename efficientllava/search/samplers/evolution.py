"""A budget-preserving evolutionary sampler in the spirit of EvoPress, as an Optuna sampler.

EvoPress (Sieberling et al., ICML 2025) searches per-unit compression levels with a (1 + lambda)
evolution: each offspring is the current best point with a few level swaps, one unit a level
up and another a level down, so every candidate keeps the compression budget, and the best
point (parent included) survives. Here it is an Optuna `BaseSampler`, so it runs through the
same OptunaSearch / Ray Tune path as TPE:

- every new trial is an offspring of the best COMPLETE trial of the study so far (of one of the
  best `parents` ones, drawn at random, when `parents` > 1); before any trial completes, of the
  starting point: every parameter at the level nearest the budget target, projected into the band;
- a mutation is 1 to `max_swaps` swaps (the count biased to small, as EvoPress draws it:
  min of two uniform draws); each swap moves one parameter up and another down by the same
  number of levels, 1 to `max_step` (drawn the same way). EvoPress moves one level per swap over
  400 generations x 64 offspring; a search of ~50 trials needs longer moves (on the tiny model,
  exploratory runs of benchmarks/search_quality.py: 3 levels beat 1 and 5 at both budgets).
  With probability `group_moves` a swap moves a group of units instead of one: a layer, a
  layer's attention or MLP matrices, or one part across layers (`unit_groups`, from the unit
  names). At matrix granularity (42 units on the tiny model, 224 on a 7B one) single-matrix swaps
  are too small a step for ~50 trials; group swaps are the depth-slope and attention/MLP-split
  moves of the known allocations, made locally;
  Coarse to fine: where the units are weight matrices (one parameter per q, k, v, o, gate, up,
  down), the first `coarse` trials (default: 2 per parameter) move only whole blocks, a layer's
  attention matrices or its MLP matrices, and single matrices only after that. A 48-trial search is
  too short to learn 42 separate ratios (the tiny model at matrix granularity) but long enough for
  its 12 block ratios, which a longer search then refines: the phase raised the 48-trial held-out
  mean from 98.7% to 100% at a 92% budget and from 92.0% to 98.2% at 94% (5 few-shot draws,
  `benchmarks/search_quality.py --granularity matrix`). Trial numbers count per round (each round
  has its own study), so each round starts coarse again, from its seed points (a later round: the
  previous round's best policies);
  Parameters carry different weights (a unit's parameter count), so a swap can move the
  weighted mean by a fraction of a step; when that leaves the budget band
  (target +- tolerance), the other parameters are moved back into it by the smallest change of
  their levels (`space.project_indices`). No offspring leaves the band;
- an offspring already in the study (any state) is redrawn, so concurrent trials differ;
- randomness comes from `seed` and the trial number only, so a sequential search is
  reproducible and concurrent workers never share a draw. Enqueued trials (seed points) run as
  given and become parents like any other.

The sampler reads the space as data: `space.params`, each with `name`, `low`, `high`, `levels`
(the ratio each value means, or None for the value itself) and `weight` (the unit's parameter
count), and `space.budget` with `target` and `tolerance` (or None: no budget, swaps only).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.pruning.units import PART_ROLES, parse_unit
from efficientllava.search.api import Space
from efficientllava.search.samplers import register_sampler
from efficientllava.space import project_indices

_EPS = 1e-9
_ATTEMPTS = 64  # offspring drawn before accepting one already in the study


class BudgetEvolutionSampler(optuna.samplers.BaseSampler):
    """(1 + lambda) evolution over level indices whose mutations never leave the budget band."""

    def __init__(self, space: Space, seed: int | None = None, *, max_swaps: int = 3, max_step: int = 3,
                 parents: int = 1, group_moves: float = 0.5, coarse: int | None = None) -> None:
        for name, value in (("max_swaps", max_swaps), ("max_step", max_step), ("parents", parents)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"evolution {name} {value!r} must be an integer >= 1")
        if coarse is not None and (isinstance(coarse, bool) or not isinstance(coarse, int) or coarse < 0):
            raise ConfigError(f"evolution coarse {coarse!r} must be an integer >= 0 (trials of block moves only)")
        if isinstance(group_moves, bool) or not isinstance(group_moves, (int, float)) or not 0 <= group_moves <= 1:
            raise ConfigError(f"evolution group_moves {group_moves!r} must be a number in [0, 1]")
        self._names = [p.name for p in space.params]
        self._low = [p.low for p in space.params]
        self._levels = [tuple(p.levels) if p.levels is not None else tuple(float(v) for v in range(p.low, p.high + 1))
                        for p in space.params]
        self._weights = [float(p.weight) for p in space.params]
        budget = space.budget
        self._band = None if budget is None else (budget.target - budget.tolerance, budget.target + budget.tolerance)
        self._seed = random.SystemRandom().randrange(2**31) if seed is None else int(seed)
        self._max_swaps = max_swaps
        self._max_step = max_step
        self._parents = parents
        self._group_moves = float(group_moves)
        self._groups = unit_groups(self._names)
        self._blocks = block_groups(self._names)
        self._coarse = (2 * len(self._names) if coarse is None else coarse) if self._blocks else 0
        self._fallback = optuna.samplers.RandomSampler(seed=self._seed)
        self._start = self._start_point()

    # -- Optuna sampler API -------------------------------------------------------------------
    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """Every parameter of the space, sampled jointly."""
        return {n: IntDistribution(lo, lo + len(lv) - 1)
                for n, lo, lv in zip(self._names, self._low, self._levels, strict=True)}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """An offspring of the best completed trial (or of the starting point), inside the budget band."""
        if trial.system_attrs.get("fixed_params"):  # an enqueued point: evaluated as given
            return {}
        rng = random.Random(f"{self._seed}/{trial.number}")
        parent = self._parent(study, rng)
        seen = self._seen(study)
        child = parent
        for _ in range(_ATTEMPTS):
            child = self._mutate(parent, rng, coarse=trial.number < self._coarse)
            if tuple(child) not in seen:
                break
        return {n: lo + k for n, lo, k in zip(self._names, self._low, child, strict=True) if n in search_space}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        """A parameter outside the space given at construction: drawn at random."""
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        """Nothing to reseed: each trial's draws come from (seed, trial number), never shared."""

    # -- evolution ----------------------------------------------------------------------------
    def _mean(self, idx: Sequence[int]) -> float:
        return math.fsum(w * lv[k] for w, lv, k in zip(self._weights, self._levels, idx, strict=True)) / math.fsum(
            self._weights)

    def in_band(self, idx: Sequence[int]) -> bool:
        """Whether level indices (0-based per parameter) meet the budget band."""
        if self._band is None:
            return True
        lo, hi = self._band
        return lo - _EPS <= self._mean(idx) <= hi + _EPS

    def _project(self, idx: list[int], frozen: Sequence[int] = ()) -> list[int]:
        if self._band is None:
            return idx
        lo, hi = self._band
        return project_indices(self._levels, idx, self._weights, lo, hi, frozen=frozen, names=self._names)

    def _start_point(self) -> list[int]:
        """Every parameter at the level nearest the target, projected into the band."""
        if self._band is None:
            idx = [len(lv) // 2 for lv in self._levels]
        else:
            target = self._band[0] / 2 + self._band[1] / 2
            idx = [_nearest(lv, target) for lv in self._levels]
        try:
            return self._project(idx)
        except PolicyError as exc:
            raise ConfigError(f"search.sampler=evolution: {exc}") from None

    def _indices(self, trial: FrozenTrial) -> list[int] | None:
        """A trial's 0-based level indices, or None when it lacks a parameter or is off the space."""
        out = []
        for n, lo, lv in zip(self._names, self._low, self._levels, strict=True):
            v = trial.params.get(n)
            if not isinstance(v, int) or not 0 <= v - lo < len(lv):
                return None
            out.append(v - lo)
        return out

    def _parent(self, study: optuna.Study, rng: random.Random) -> list[int]:
        """The best completed point (one of the best `parents`), projected into the band; else the start."""
        sign = 1.0 if study.directions[0] == StudyDirection.MAXIMIZE else -1.0
        done = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            idx = self._indices(t)
            if idx is not None and t.values and math.isfinite(t.values[0]):
                done.append((-sign * t.values[0], t.number, idx))
        if not done:
            return list(self._start)
        done.sort(key=lambda x: (x[0], x[1]))
        idx = rng.choice(done[: self._parents])[2]
        if self.in_band(idx):
            return idx
        try:
            return self._project(idx)
        except PolicyError:
            return list(self._start)

    def _seen(self, study: optuna.Study) -> set[tuple[int, ...]]:
        seen = set()
        for t in study.get_trials(deepcopy=False):
            idx = self._indices(t)
            if idx is not None:
                seen.add(tuple(idx))
        return seen

    def _mutate(self, parent: list[int], rng: random.Random, coarse: bool = False) -> list[int]:
        """1..max_swaps swaps between two parameters (or two groups of them; with `coarse` always two
        blocks), then back into the band if needed."""
        child = list(parent)
        n = len(child)
        swaps = min(rng.randint(1, self._max_swaps), rng.randint(1, self._max_swaps))
        touched: list[int] = []
        for _ in range(swaps):
            step = min(rng.randint(1, self._max_step), rng.randint(1, self._max_step))
            if coarse or (self._groups and rng.random() < self._group_moves):
                groups = self._blocks if coarse else self._groups
                up_group = rng.choice(groups)
                others = [g for g in groups if not set(g) & set(up_group)]
                if not others:
                    continue
                ups, downs = list(up_group), list(rng.choice(others))
            else:
                movable_up = [i for i in range(n) if child[i] + 1 < len(self._levels[i])]
                movable_down = [i for i in range(n) if child[i] > 0]
                if not movable_up or not movable_down or n < 2:
                    break
                i = rng.choice(movable_up)
                movable_down = [j for j in movable_down if j != i]
                if not movable_down:
                    break
                ups, downs = [i], [rng.choice(movable_down)]
            for i in ups:
                child[i] = min(child[i] + step, len(self._levels[i]) - 1)
            for j in downs:
                child[j] = max(child[j] - step, 0)
            touched += ups + downs
        if self.in_band(child):
            return child
        for frozen in (touched, []):  # compensate with the other parameters first
            try:
                return self._project(child, frozen=frozen)
            except PolicyError:
                continue
        return list(parent)


def unit_groups(names: Sequence[str]) -> list[tuple[int, ...]]:
    """Indices of parameters that form a unit group: a layer's units, a layer's attention or MLP
    matrices, one part across layers (e.g. every `attn`, every `q`). Only groups of 2 or more; none
    when the names are not unit names (`pruning.units.parse_unit`)."""
    return _groups(names, ("layer", "block", "part"))


def block_groups(names: Sequence[str]) -> list[tuple[int, ...]]:
    """Indices of each layer's attention matrices and of its MLP matrices (groups of 2 or more, so none
    at layer or sublayer granularity, where a block is one unit already)."""
    return _groups(names, ("block",))


def _groups(names: Sequence[str], kinds: Sequence[str]) -> list[tuple[int, ...]]:
    try:
        parsed = [parse_unit(n) for n in names]
    except ConfigError:
        return []
    keys: dict[tuple[str, object], list[int]] = {}
    for i, (layer, part) in enumerate(parsed):
        block = "attn" if part in PART_ROLES["attn"] else "mlp" if part in PART_ROLES["mlp"] else part
        for key in (("layer", layer), ("block", (layer, block)), ("part", part)):
            if key[0] in kinds:
                keys.setdefault(key, []).append(i)
    return sorted({tuple(v) for v in keys.values() if len(v) > 1})


def _nearest(levels: Sequence[float], value: float) -> int:
    """Index of the level nearest `value` (the lower one on a tie)."""
    return min(range(len(levels)), key=lambda i: (abs(levels[i] - value), i))


@register_sampler("evolution")
def make_evolution(search: Any, seed: int, space: Space) -> optuna.samplers.BaseSampler:
    """The budget-preserving evolutionary sampler (one parent: EvoPress's elitist (1 + lambda))."""
    return BudgetEvolutionSampler(space, seed)
