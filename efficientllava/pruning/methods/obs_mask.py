"""Mask-only OBS: rank weights by the OBS saliency w^2 / [H^-1]_jj^2 once, and prune without updating.

This is how the EfficientLLaVA paper describes its masks (OBS saliency from the dense weight and the
layer Hessian). The saliency is computed once from the dense weight, so the masks nest across levels
and a whole bank is one level index per weight. Unlike SparseGPT, the kept weights are not updated:
the pruned weight is the dense weight under the mask. Inputs that were always zero (dead) cannot
matter; their weights are pruned first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from efficientllava.errors import ConfigError
from efficientllava.pruning.calibrate import LayerStats
from efficientllava.pruning.methods.base import Calibration, MethodOptions, NestedMethod, register_method


@dataclass(frozen=True)
class OBSMaskOptions(MethodOptions):
    """Hessian dampening, as a fraction of its mean diagonal (as SparseGPT's percdamp)."""

    percdamp: float = 0.01

    def __post_init__(self) -> None:
        """Validate percdamp."""
        p = self.percdamp
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p > 0):
            raise ConfigError(f"percdamp {p!r} must be a number > 0")
        object.__setattr__(self, "percdamp", float(p))


def inverse_hessian_diag(hessian: Tensor, percdamp: float) -> Tensor:
    """diag((H + damp I)^-1) [in], float32; 0 at dead inputs (whose weights get saliency 0)."""
    H = hessian.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    try:
        inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    except torch.linalg.LinAlgError as err:
        raise ConfigError(f"obs_mask: Hessian is not positive definite ({err}): raise percdamp") from err
    return torch.diag(inv).masked_fill(dead, 0.0).contiguous()


@register_method
class OBSMask(NestedMethod):
    """OBS saliency w^2 / [H^-1]_jj^2 from the dense weight; masks only, exact per matrix."""

    name = "obs_mask"
    stats = "hessian"
    scope = "matrix"
    options_type = OBSMaskOptions
    options: OBSMaskOptions

    def prepare(self, stats: LayerStats | None) -> dict[str, Tensor]:
        """Only the inverse Hessian's diagonal: in_features floats per input stream."""
        hessian = super().prepare(stats)["hessian"]
        return {"hinv_diag": inverse_hessian_diag(hessian, self.options.percdamp)}

    def saliency(self, weight: Tensor, calib: Calibration) -> Tensor:
        """w^2 / [H^-1]_jj^2; dead inputs score 0."""
        d = calib["hinv_diag"].to(weight.device, torch.float32)
        if d.shape != (weight.shape[1],):
            raise ValueError(f"hinv_diag has shape {tuple(d.shape)}, expected ({weight.shape[1]},)")
        w = weight.float()
        live = d > 0
        return torch.where(live, w**2 / torch.where(live, d, 1.0) ** 2, 0.0)
