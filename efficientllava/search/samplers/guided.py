"""The attribution-guided sampler: a sensitivity per unit from each trial's backward pass, then a DP step.

A pruned model's KL to the dense model is, to second order, a sum over units (`scoring.attribution`):
unit u at level l costs about s_u * e_u(l), where e_u(l) is its own reconstruction error
(`pruning.reconstruction`, the curve error DP minimises) and s_u how strongly that error reaches the
answer, which error DP takes to be 1 for every unit and which is far from it (a layer's error is
amplified or damped by the layers above it). Each scored trial splits its KL into per-unit shares a_u
(one backward pass), so it measures s_u = a_u / e_u(l_u) for every unit it prunes at once, not one
number per trial as a black-box sampler gets. The next trial is the budget DP
(`budget_dp.least_cost_indices`) on s_u * e_u(l):

- sensitivities: each unit's mean log sensitivity over the `top` best completed trials (the model is
  most accurate near where it was measured, and a mean over a few points steadies it); a unit none of
  them measured (a negative share measures nothing) takes its mean over the `pool` best, else the median;
- a trust region: each unit moves at most `radius` levels from the best trial's level, less as trials
  fail to improve on it (one level fewer per `shrink` of them, down to 1), so a step stays where the
  sensitivities describe the model and a stalled search refines instead of jumping;
- exploration: odd trial numbers (and a proposal that is already in the study) scale each
  sensitivity by a log-normal factor (sd `noise`), so concurrent trials differ and a step that keeps
  proposing the same point draws a new one; after `_ATTEMPTS` repeats it is an evolution offspring.

The defaults (radius 3, shrink 3, top 3, pool 5) were picked on the tiny model at matrix granularity and
a 94% budget (48 trials, few-shot draws 0-4 of `benchmarks/search_quality.py`): the best trial's own
sensitivities alone (top 1, no shrinking) reached 97.2% held-out, round 0's 11 seed points in the pool
hurt (their sensitivities describe other regions), and top 3 with a shrinking region reached 99.5%.

Trials without attributions (a problem that does not report them, or before any trial completes)
get the budget-preserving evolution (`samplers.evolution`, which this sampler extends). Without error
curves in the space (`Param.errors`; `search.error_dp: false`) every unit's curve is its level squared,
a placeholder the sensitivities rescale. Every proposal lies in the budget band by construction.

The README's search-quality tables compare it with every other sampler and a 10x longer evolution; each
of its trials costs one backward pass more than a plain evaluation (their `ms / trial` column).
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from efficientllava.budget_dp import least_cost_indices
from efficientllava.errors import ConfigError, PolicyError
from efficientllava.search.api import ATTRIBUTION_ATTR, Space
from efficientllava.search.samplers import register_sampler
from efficientllava.search.samplers.evolution import BudgetEvolutionSampler

_ATTEMPTS = 16  # DP proposals drawn before falling back to an evolution offspring


class GuidedSampler(BudgetEvolutionSampler):
    """Budget DP on reconstruction errors scaled by per-unit sensitivities measured by the trials."""

    def __init__(self, space: Space, seed: int | None = None, *, radius: int = 3, shrink: int = 3, top: int = 3,
                 pool: int = 5, noise: float = 0.3, **evolution: Any) -> None:
        for name, value in (("radius", radius), ("shrink", shrink), ("top", top), ("pool", pool)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"guided {name} {value!r} must be an integer >= 1")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < 5:
            raise ConfigError(f"guided noise {noise!r} must be a number in [0, 5) (sd of the log-sensitivities)")
        super().__init__(space, seed, **evolution)
        self._radius, self._shrink, self._top, self._pool = radius, shrink, top, pool
        self._noise = float(noise)
        curves = [p.errors for p in space.params]
        if all(c is not None for c in curves):
            self._curves = [tuple(c) for c in curves if c is not None]
        else:  # no error table: a placeholder shape, rescaled per unit by what trials measure
            self._curves = [tuple(lv * lv for lv in levels) for levels in self._levels]

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """A DP step from the best measured trial; an evolution offspring while nothing is measured."""
        if trial.system_attrs.get("fixed_params"):
            return {}
        idx = self._guided(study, trial)
        if idx is None:
            return super().sample_relative(study, trial, search_space)
        return {n: lo + k for n, lo, k in zip(self._names, self._low, idx, strict=True) if n in search_space}

    def _measured(self, study: optuna.Study) -> list[tuple[float, list[int], dict[int, float], int]]:
        """(loss, level indices, {parameter: log sensitivity}, number) of every completed trial with attributions."""
        sign = 1.0 if study.directions[0] == StudyDirection.MAXIMIZE else -1.0
        out = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            shares = t.user_attrs.get(ATTRIBUTION_ATTR)
            idx = self._indices(t)
            if not shares or idx is None or not t.values or not math.isfinite(t.values[0]):
                continue
            logs = {}
            for i, (name, k) in enumerate(zip(self._names, idx, strict=True)):
                a, e = shares.get(name), self._curves[i][k]
                if isinstance(a, (int, float)) and a > 0 and e > 0:  # a negative share measures nothing here
                    logs[i] = math.log(a / e)
            out.append((-sign * t.values[0], idx, logs, t.number))
        return out

    def _guided(self, study: optuna.Study, trial: FrozenTrial) -> list[int] | None:
        """The next DP proposal, or None (nothing measured yet, no band, or only repeats)."""
        measured = self._measured(study)
        if self._band is None or not measured:
            return None
        ranked = sorted(measured, key=lambda m: (m[0], m[3]))
        best, number = ranked[0][1], ranked[0][3]
        near, pooled = _log_means(ranked[: self._top]), _log_means(ranked[: self._pool])
        if not pooled:
            return None
        fill = statistics.median(pooled.values())
        sens = [near.get(i, pooled.get(i, fill)) for i in range(len(self._names))]
        failures = sum(1 for m in measured if m[3] > number)  # trials since the best one, none better
        radius = max(1, self._radius - failures // self._shrink)
        rng = random.Random(f"{self._seed}/guided/{trial.number}")
        seen = self._seen(study)
        lo, hi = self._band
        for attempt in range(_ATTEMPTS):
            sd = self._noise if attempt > 0 or trial.number % 2 == 1 else 0.0
            costs = []
            for i, curve in enumerate(self._curves):
                scale = math.exp(sens[i] + (rng.gauss(0.0, sd) if sd else 0.0))
                costs.append([e * scale if abs(k - best[i]) <= radius else math.inf
                              for k, e in enumerate(curve)])
            try:
                idx = least_cost_indices(self._levels, self._weights, costs, lo, hi, names=self._names)
            except PolicyError:
                return None
            if tuple(idx) not in seen:
                return idx
        return None


def _log_means(measured: list[tuple[float, list[int], dict[int, float], int]]) -> dict[int, float]:
    """Each parameter's mean log sensitivity over `measured` (those that measured it)."""
    pooled: dict[int, list[float]] = {}
    for _, _, logs, _ in measured:
        for i, v in logs.items():
            pooled.setdefault(i, []).append(v)
    return {i: statistics.fmean(vs) for i, vs in pooled.items()}


@register_sampler("guided", attribution=True)
def make_guided(search: Any, seed: int, space: Space) -> optuna.samplers.BaseSampler:
    """The attribution-guided DP sampler (evolution offspring until trials report attributions)."""
    return GuidedSampler(space, seed)
