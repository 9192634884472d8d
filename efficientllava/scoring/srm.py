"""Structural-risk-minimisation penalty: a Rademacher generalisation-gap bound of a pruned model.

The few-shot score of a policy is its accuracy on N samples; how far that can be trusted depends
on N and on the capacity the pruned model keeps. A bound of the Golowich et al. (2018) family
(size-independent sample complexity of neural networks) gives, with probability >= 1 - delta,

    gap(pi) = 2 * Rad_N(pi) + sqrt(log(1/delta) / (2 N)),   Rad_N(pi) = scale * rho(pi) / sqrt(N),

and the search maximises `accuracy - lam * gap(pi)` (a lower confidence bound when lam = 1).
`rho(pi)` is the capacity of the pruned (masked) weights relative to the dense model, built from
the per-matrix ratios r_l = ||W_l * M_l(pi)||_F / ||W_l||_F (each <= 1), summed in log space.
W_l * M_l is the dense weight under the policy's mask, as the bound is written, not SparseGPT's
updated weights: on the tiny model those grow to 1.4-2.3x the dense norm at 80-98% sparsity,
which would make the penalty reward *less* pruning.
Normalising by the dense model makes the term scale-free across models: rho(dense) = 1, so
the dense gap is exactly 2 * scale / sqrt(N) + sqrt(log(1/delta) / (2N)). `scale` absorbs the
bound's input-norm and depth constants (B * (sqrt(2 L log 2) + 1) in Golowich et al.).

Aggregate (a design decision): the bound's own form is the product rho = prod_l r_l. But a 7B
LLaVA has ~224 pruned matrices (32 layers x 7), and for any real pruning the product of ratios
each below 1 vanishes (0.9^224 ~ 1e-10): every pruned policy then gets the same penalty, and
the penalty is a constant and cannot rank policies. The default `aggregate="geometric_mean"`
uses rho = (prod_l r_l)^(1/L), the L-th root of the normalised product: the per-layer ratio of a
network whose norms are balanced across its L layers. Bounds of this family only see the product
and are invariant to rebalancing norms between layers (scaling W_i by c and W_j by 1/c leaves a
ReLU-like network unchanged), so any network can be read as its balanced twin. The geometric
mean ranks policies exactly as the product does (a monotone transform of it) but stays in
(0, 1], comparable across models of any depth and on the scale of accuracy differences.
`aggregate="product"` is kept for the literal bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.policy import PruningPolicy

AGGREGATES = ("geometric_mean", "product")
_LEVEL_DIGITS = 6  # levels are matched at this precision (0.30000000000000004 == 0.3)


@dataclass(frozen=True)
class SRMConfig:
    """Constants of the SRM penalty: weight `lam`, confidence `delta`, capacity `scale`, aggregate."""

    lam: float = 1.0
    delta: float = 0.05
    scale: float = 1.0
    aggregate: str = "geometric_mean"

    def __post_init__(self) -> None:
        """Validate the constants."""
        if not _finite(self.lam) or self.lam < 0:
            raise ConfigError(f"srm.lam {self.lam!r} must be a number >= 0 (0 disables the penalty)")
        _check_delta(self.delta)
        _check_scale(self.scale)
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"srm.aggregate {self.aggregate!r} is not one of {', '.join(AGGREGATES)}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_delta(delta: float) -> None:
    if not _finite(delta) or not 0.0 < delta < 1.0:
        raise ConfigError(
            f"srm.delta {delta!r} must be in (0, 1) (the bound holds with probability 1 - delta)"
        )


def _check_scale(scale: float) -> None:
    if not _finite(scale) or scale <= 0:
        raise ConfigError(f"srm.scale {scale!r} must be a number > 0")


def log_norm_ratios(
    policy: PruningPolicy,
    pruned_norms: Mapping[tuple[str, float], float],
    dense_norms: Mapping[str, float],
    unit_linears: Mapping[str, Sequence[str]],
) -> list[float]:
    """log(||W*M||_F / ||W||_F) for every linear of every unit, in policy order.

    `pruned_norms` is keyed by `(linear_name, level)`; level 0.0 uses the dense norm. Levels are
    matched to 6 decimal places.
    """
    by_level = {(name, round(level, _LEVEL_DIGITS)): norm for (name, level), norm in pruned_norms.items()}
    out: list[float] = []
    for unit, level in policy.ratios:
        if unit not in unit_linears:
            raise PolicyError(f"unit {unit!r} has no linears listed; cannot compute its norm ratio")
        for name in unit_linears[unit]:
            if name not in dense_norms:
                raise PolicyError(f"no dense norm for linear {name!r} (unit {unit!r})")
            dense = float(dense_norms[name])
            if not dense > 0:
                raise PolicyError(f"dense norm of linear {name!r} is {dense!r}; a weight norm must be > 0")
            if level == 0.0:
                out.append(0.0)
                continue
            key = (name, round(level, _LEVEL_DIGITS))
            if key not in by_level:
                raise PolicyError(
                    f"no pruned norm for linear {name!r} at level {level:g} (unit {unit!r}); "
                    "calibrate that level first"
                )
            pruned = float(by_level[key])
            # A fully-zeroed matrix has no capacity: log 0 = -inf makes the capacity 0.
            out.append(math.log(pruned / dense) if pruned > 0 else -math.inf)
    return out


def capacity(log_ratios: Sequence[float], aggregate: str = "geometric_mean") -> float:
    """rho(pi) from per-matrix log norm ratios: exp(mean) for "geometric_mean", exp(sum) for "product"."""
    if aggregate not in AGGREGATES:
        raise ConfigError(f"srm.aggregate {aggregate!r} is not one of {', '.join(AGGREGATES)}")
    if not log_ratios:
        raise PolicyError("no weight matrices to measure; the policy covers no linears")
    total = math.fsum(log_ratios)
    return math.exp(total / len(log_ratios) if aggregate == "geometric_mean" else total)


def generalization_gap(capacity: float, n_samples: int, delta: float = 0.05, scale: float = 1.0) -> float:
    """2 * scale * capacity / sqrt(N) + sqrt(log(1/delta) / (2N))."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"number of samples {n_samples!r} must be an integer >= 1")
    _check_delta(delta)
    _check_scale(scale)
    if not _finite(capacity) or capacity < 0:
        raise ConfigError(f"capacity {capacity!r} must be a finite number >= 0")
    rademacher = scale * capacity / math.sqrt(n_samples)
    return 2.0 * rademacher + math.sqrt(math.log(1.0 / delta) / (2.0 * n_samples))


def srm_penalty(
    policy: PruningPolicy,
    pruned_norms: Mapping[tuple[str, float], float],
    dense_norms: Mapping[str, float],
    unit_linears: Mapping[str, Sequence[str]],
    n_samples: int,
    config: SRMConfig = SRMConfig(),  # noqa: B008 - frozen, so a shared default is safe
) -> float:
    """lam * gap(pi): what the objective subtracts from the few-shot accuracy."""
    logs = log_norm_ratios(policy, pruned_norms, dense_norms, unit_linears)
    rho = capacity(logs, config.aggregate)
    return config.lam * generalization_gap(rho, n_samples, config.delta, config.scale)
