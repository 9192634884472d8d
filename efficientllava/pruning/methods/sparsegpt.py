"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with blockwise adaptive masks and error compensation.

Follows the reference `SparseGPT.fasterprune` (github.com/IST-DASLab/sparsegpt) step for step. One
deliberate difference: the reference keeps `score <= sorted[int(numel*s)]` per block, which prunes one
entry too many per block and more on ties; here each block prunes an exact count, allotted so that the
whole matrix gets exactly floor(sparsity * numel) masked entries (ties: lower flat index first).

The damped inverse Hessian's Cholesky factor depends only on the input stream, so `prepare` computes it
once for all linears fed that stream and all levels, and keeps only its upper triangle, as the block rows
the algorithm reads (`hinv.<b>` = rows of block b from its diagonal on): about half the square's bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from efficientllava.errors import ConfigError
from efficientllava.pruning.calibrate import LayerStats
from efficientllava.pruning.masks import lowest_mask
from efficientllava.pruning.methods.base import Calibration, MethodOptions, PruningMethod, register_method
from efficientllava.pruning.patterns import Pattern, check_nm_fits, check_sparsity


@dataclass(frozen=True)
class SparseGPTOptions(MethodOptions):
    """Hessian dampening (fraction of its mean diagonal) and the column block size."""

    percdamp: float = 0.01
    blocksize: int = 128

    def __post_init__(self) -> None:
        """Validate both options."""
        p = self.percdamp
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p > 0):
            raise ConfigError(f"percdamp {p!r} must be a number > 0")
        b = self.blocksize
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"blocksize {b!r} must be an integer >= 1")
        object.__setattr__(self, "percdamp", float(p))


def inverse_hessian_rows(hessian: Tensor, percdamp: float, blocksize: int) -> dict[str, Tensor]:
    """`dead` inputs and the block rows `hinv.<b>` of the upper Cholesky factor of (H + damp I)^-1."""
    cols = hessian.shape[0]
    H = hessian.detach().to(torch.float32).clone()  # callers share H across q/k/v: never edit it
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1
    diag = torch.arange(cols, device=H.device)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ConfigError(f"sparsegpt: Hessian is not positive definite ({err}): raise percdamp") from err
    out = {"dead": dead}
    for b, i1 in enumerate(range(0, cols, blocksize)):
        out[f"hinv.{b}"] = Hinv[i1 : i1 + blocksize, i1:].contiguous()
    return out


def sparsegpt_update(weight: Tensor, calib: Calibration, sparsity: float, pattern: Pattern,
                     blocksize: int) -> Tensor:
    """Pruned and OBS-updated copy of `weight` [out, in] from `inverse_hessian_rows` tensors."""
    rows, cols = weight.shape
    n, m = pattern.n, pattern.m
    if pattern.is_nm and blocksize % m:
        raise ConfigError(f"sparsegpt blocksize {blocksize} must be a multiple of m={m} for pattern {pattern}")
    dev = weight.device
    dead = calib["dead"].to(dev)
    if dead.shape != (cols,):
        raise ValueError(f"sparsegpt calibration is for {dead.shape[0]} inputs, the weight has {cols}")
    W = weight.detach().to(torch.float32, copy=True)
    W[:, dead] = 0

    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        block = calib[f"hinv.{b}"].to(dev, torch.float32)  # Hinv[i1:i2, i1:]
        Hinv1 = block[:, : i2 - i1]
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
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
        W[:, i2:] -= Err1 @ block[:, i2 - i1 :]  # lazy batched update of the remaining columns
    return W.to(weight.dtype)


def sparsegpt_prune(weight: Tensor, hessian: Tensor, sparsity: float, pattern: Pattern | str,
                    blocksize: int = 128, percdamp: float = 0.01) -> Tensor:
    """Pruned and OBS-updated copy of `weight` [out, in] given the layer Hessian [in, in] = 2/n X^T X."""
    pattern = Pattern.parse(pattern)
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if blocksize < 1 or percdamp < 0:
        raise ConfigError(f"sparsegpt needs blocksize >= 1 and percdamp >= 0, got {blocksize} and {percdamp}")
    if check_sparsity(sparsity, pattern) == 0.0:
        return weight.detach().clone()
    check_nm_fits(pattern, cols)
    calib = inverse_hessian_rows(hessian.to(weight.device), percdamp, blocksize)
    return sparsegpt_update(weight, calib, sparsity, pattern, blocksize)


@register_method
class SparseGPT(PruningMethod):
    """SparseGPT: OBS masks chosen column block by column block, kept weights updated to compensate."""

    name = "sparsegpt"
    stats = "hessian"
    nested = False
    scope = "matrix"
    options_type = SparseGPTOptions
    options: SparseGPTOptions

    def prepare(self, stats: LayerStats | None) -> dict[str, Tensor]:
        """The damped inverse Hessian's Cholesky factor as block rows, plus the dead inputs."""
        hessian = super().prepare(stats)["hessian"]
        return inverse_hessian_rows(hessian, self.options.percdamp, self.options.blocksize)

    def prune(self, weight: Tensor, calib: Calibration, sparsity: float, pattern: Pattern) -> Tensor:
        """SparseGPT's pruned and updated weight."""
        return sparsegpt_update(weight, calib, sparsity, pattern, self.options.blocksize)
