"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, pruned per output row (or N:M)."""

from __future__ import annotations

import torch
from torch import Tensor

from efficientllava.pruning.masks import nm_mask, unstructured_mask
from efficientllava.pruning.patterns import Pattern, check_sparsity


def wanda_prune(weight: Tensor, col_sq_norm: Tensor, sparsity: float, pattern: Pattern | str) -> Tensor:
    """Pruned copy of `weight` [out, in]; `col_sq_norm` [in] = sum over tokens of x_j^2."""
    pattern = Pattern.parse(pattern)
    if col_sq_norm.shape != (weight.shape[1],):
        raise ValueError(f"col_sq_norm has shape {tuple(col_sq_norm.shape)}, expected ({weight.shape[1]},)")
    if check_sparsity(sparsity, pattern) == 0.0:
        return weight.detach().clone()
    w = weight.detach().float()
    score = w.abs() * col_sq_norm.to(w.device, torch.float32).sqrt().unsqueeze(0)
    mask = nm_mask(score, pattern.n, pattern.m) if pattern.is_nm else unstructured_mask(score, sparsity, True)
    return w.masked_fill(mask, 0.0).to(weight.dtype)
