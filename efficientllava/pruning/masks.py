"""Pruning masks from importance scores (True = prune); ties go to the lower index, deterministically."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from efficientllava.errors import PolicyError


def lowest_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the `k` lowest entries along the last dim (stable sort breaks ties by index)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, idx, True)
    return mask


def unstructured_mask(scores: Tensor, sparsity: float, per_row: bool) -> Tensor:
    """Prune the lowest scores: floor(sparsity*cols) in each row if `per_row`, else floor(sparsity*numel)."""
    if per_row:
        return lowest_mask(scores, math.floor(sparsity * scores.shape[-1]))
    return lowest_mask(scores.reshape(-1), math.floor(sparsity * scores.numel())).reshape(scores.shape)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Prune the `n` lowest scores in every group of `m` consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise PolicyError(
            f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {cols}: use unstructured"
        )
    return lowest_mask(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)
