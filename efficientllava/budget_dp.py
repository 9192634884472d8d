"""Least-cost levels under a budget band: the knapsack DP behind error DP and the guided sampler.

Each unit i takes one of its levels k at a cost c[i][k] (an additive model of the damage, e.g. the
unit's reconstruction error, or that error scaled by a per-unit sensitivity); the DP picks the
levels with the least summed cost whose weighted mean level lies in [lo, hi]. The weighted level
sum is quantised to q = band width x total weight / (4 x units): rounding moves the sum by at most
a quarter of the band, so states are kept a quarter inside it and the result is checked exactly
(then projected, never needed in practice). A cost of +inf forbids a level. Deterministic (ties:
lower levels first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from efficientllava.errors import PolicyError
from efficientllava.space import project_indices


def least_cost_indices(levels: Sequence[Sequence[float]], weights: Sequence[float],
                       costs: Sequence[Sequence[float]], lo: float, hi: float,
                       names: Sequence[str] | None = None) -> list[int]:
    """Level indices with the least summed `costs` whose `weights`-averaged level lies in [lo, hi]."""
    w = [float(x) for x in weights]
    total = math.fsum(w)
    lo_sum, hi_sum = lo * total, hi * total  # bounds on the weighted level sum
    base = math.fsum(wi * min(lvs) for wi, lvs in zip(w, levels, strict=True))
    q = max((hi_sum - lo_sum) / (4 * len(levels)), total * 1e-7)
    shifts = [[round(wi * (lv - min(lvs)) / q) for lv in lvs] for wi, lvs in zip(w, levels, strict=True)]
    size = sum(max(s) for s in shifts) + 1
    best = torch.full((size,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    back = []
    for lvs, sh, cost in zip(levels, shifts, costs, strict=True):
        new = torch.full_like(best, math.inf)
        arg = torch.zeros(size, dtype=torch.int8 if len(lvs) <= 127 else torch.int16)  # 224 units x 4e5 states on 7B
        for k, s in enumerate(sh):
            cand = torch.full_like(best, math.inf)
            cand[s:] = best[: size - s] + float(cost[k])
            better = cand < new
            new = torch.where(better, cand, new)
            arg[better] = k
        best = new
        back.append(arg)
    sums = base + torch.arange(size, dtype=torch.float64) * q
    margin = (hi_sum - lo_sum) / 4
    ok = (sums >= lo_sum + margin) & (sums <= hi_sum - margin) & torch.isfinite(best)
    if not bool(ok.any()):
        raise PolicyError(f"no levels reach the budget band [{lo:g}, {hi:g}] (at a finite cost)")
    state = int(torch.where(ok, best, torch.full_like(best, math.inf)).argmin())
    idx = []
    for arg, sh in zip(reversed(back), reversed(shifts), strict=True):
        k = int(arg[state])
        idx.append(k)
        state -= sh[k]
    idx.reverse()
    return project_indices(levels, idx, w, lo, hi, names=names)
