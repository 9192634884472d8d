"""Dispatch of the pruning criteria by name."""

from __future__ import annotations

from torch import Tensor

from efficientllava.errors import ConfigError
from efficientllava.pruning.calibrate import LayerStats
from efficientllava.pruning.magnitude import magnitude_prune
from efficientllava.pruning.patterns import Pattern
from efficientllava.pruning.sparsegpt import sparsegpt_prune
from efficientllava.pruning.wanda import wanda_prune

METHODS = ("sparsegpt", "wanda", "magnitude")


def _check(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"pruning method {method!r} is unknown: use one of {', '.join(METHODS)}")


def needs_hessian(method: str) -> bool:
    """True if `method` needs the layer Hessian (not only column norms) from calibration."""
    _check(method)
    return method == "sparsegpt"


def needs_stats(method: str) -> bool:
    """True if `method` needs calibration statistics at all."""
    _check(method)
    return method != "magnitude"


def prune_weight(
    method: str,
    weight: Tensor,
    stats: LayerStats | None,
    sparsity: float,
    pattern: Pattern | str,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> Tensor:
    """Pruned copy of `weight` [out, in] by `method`, in the weight's dtype and on its device."""
    if needs_stats(method) and stats is None:
        raise ValueError(f"pruning method {method!r} needs calibration statistics (LayerStats), got None")
    if method == "magnitude":
        return magnitude_prune(weight, sparsity, pattern)
    if method == "wanda":
        return wanda_prune(weight, stats.col_sq_norm, sparsity, pattern)
    if stats.hessian is None:
        raise ValueError("sparsegpt needs a Hessian: collect stats with need_hessian=True")
    return sparsegpt_prune(weight, stats.hessian, sparsity, pattern, blocksize=blocksize, percdamp=percdamp)
