"""Pruning masks from importance scores (True = prune); ties go to the lower index, deterministically."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from efficientllava.errors import PolicyError
from efficientllava.pruning.patterns import Pattern


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


def _sort_keys(scores: Tensor) -> Tensor:
    """int32 keys whose signed order is the float order of `scores` (-0.0 counts as +0.0).

    Sorting the keys is a radix sort, several times faster on CPU than sorting the floats.
    """
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def level_index(scores: Tensor, levels: Sequence[float], pattern: Pattern, per_row: bool) -> Tensor:
    """uint8 [out, in]: how many of the ascending `levels` keep each weight, pruning the lowest scores first.

    At level j (1-based) the kept weights are exactly `index >= j`, and the pruned ones are those
    `lowest_mask` gives: floor(s*numel) per matrix, floor(s*in) per row if `per_row`, or the n lowest
    of every m consecutive weights of a row for an N:M pattern (ties: lower index first). So masks
    nest across levels.
    """
    if len(levels) > 255:
        raise PolicyError(f"{len(levels)} levels do not fit a uint8 level index (at most 255)")
    rows, cols = scores.shape
    if pattern.is_nm:
        if cols % pattern.m:
            raise PolicyError(f"N:M pattern {pattern} needs in_features divisible by {pattern.m}, got {cols}")
        groups, counts = scores.reshape(rows, cols // pattern.m, pattern.m), [pattern.n for _ in levels]
    elif per_row:
        groups, counts = scores, [math.floor(s * cols) for s in levels]
    else:
        groups, counts = scores.reshape(-1), [math.floor(s * scores.numel()) for s in levels]
    if any(b < a for a, b in zip(counts, counts[1:], strict=False)):
        raise ValueError(f"levels {tuple(levels)} are not ascending")
    # The weight at sorted position p (lowest first) is kept by the levels whose pruned count is <= p.
    size = groups.shape[-1]
    by_position = torch.zeros(size, dtype=torch.uint8, device=scores.device)
    for count in counts:
        by_position[count:] += 1
    order = torch.sort(_sort_keys(groups), dim=-1, stable=True).indices
    index = torch.empty(groups.shape, dtype=torch.uint8, device=scores.device)
    index.scatter_(-1, order, by_position.expand(groups.shape))
    return index.reshape(rows, cols)
