"""Magnitude pruning: drop the smallest |W| (one threshold for the whole matrix, or N:M)."""

from __future__ import annotations

from torch import Tensor

from efficientllava.pruning.masks import nm_mask, unstructured_mask
from efficientllava.pruning.patterns import Pattern, check_sparsity


def magnitude_prune(weight: Tensor, sparsity: float, pattern: Pattern | str) -> Tensor:
    """Pruned copy of `weight` [out, in]: exactly floor(sparsity*numel) zeros, or the N:M pattern."""
    pattern = Pattern.parse(pattern)
    if check_sparsity(sparsity, pattern) == 0.0:
        return weight.detach().clone()
    w = weight.detach().float()
    score = w.abs()
    mask = (
        nm_mask(score, pattern.n, pattern.m) if pattern.is_nm else unstructured_mask(score, sparsity, False)
    )
    return w.masked_fill(mask, 0.0).to(weight.dtype)
