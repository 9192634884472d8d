"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with blockwise adaptive masks and error compensation.

Follows the reference `SparseGPT.fasterprune` (github.com/IST-DASLab/sparsegpt) step for step. One
deliberate difference: the reference keeps `score <= sorted[int(numel*s)]` per block, which prunes one
entry too many per block and more on ties; here each block prunes an exact count, allotted so that the
whole matrix gets exactly floor(sparsity * numel) masked entries (ties: lower flat index first).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.pruning.masks import lowest_mask
from efficientllava.pruning.patterns import Pattern, check_sparsity


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    pattern: Pattern | str,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> Tensor:
    """Pruned and OBS-updated copy of `weight` [out, in] given the layer Hessian [in, in] = 2/n X^T X."""
    pattern = Pattern.parse(pattern)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if blocksize < 1 or percdamp < 0:
        raise ConfigError(f"sparsegpt needs blocksize >= 1 and percdamp >= 0, got {blocksize} and {percdamp}")
    if check_sparsity(sparsity, pattern) == 0.0:
        return weight.detach().clone()
    n, m = pattern.n, pattern.m
    if pattern.is_nm and cols % m:
        raise PolicyError(
            f"N:M pattern {pattern} needs in_features divisible by {m}, got {cols}: use unstructured"
        )
    if pattern.is_nm and blocksize % m:
        raise ConfigError(
            f"sparsegpt blocksize {blocksize} must be a multiple of m={m} for pattern {pattern}"
        )

    dev = weight.device
    W = weight.detach().to(torch.float32, copy=True)
    H = hessian.detach().to(dev, torch.float32).clone()  # callers share H across q/k/v: never edit it
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.arange(cols, device=dev)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ConfigError(f"sparsegpt: Hessian is not positive definite ({err}): raise percdamp") from err
    del H

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:  # cumulative floors: block counts sum to exactly floor(sparsity * numel)
            k = math.floor(sparsity * (rows * i2)) - math.floor(sparsity * (rows * i1))
            mask1 = lowest_mask((W1**2 / d1.unsqueeze(0) ** 2).reshape(-1), k).reshape(W1.shape)
        for i in range(i2 - i1):
            if pattern.is_nm and i % m == 0:
                mask1[:, i : i + m] = lowest_mask(W1[:, i : i + m] ** 2 / d1[i : i + m].unsqueeze(0) ** 2, n)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err1 = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # OBS update within the block
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batched update of the remaining columns
    return W.to(weight.dtype)
