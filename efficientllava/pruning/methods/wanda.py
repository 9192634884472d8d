"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, pruned per output row (or N:M)."""

from __future__ import annotations

import torch
from torch import Tensor

from efficientllava.pruning.methods.base import Calibration, NestedMethod, register_method


@register_method
class Wanda(NestedMethod):
    """Wanda: weight magnitude times its input's norm over the calibration tokens; exact per output row."""

    name = "wanda"
    stats = "norms"
    scope = "row"

    def saliency(self, weight: Tensor, calib: Calibration) -> Tensor:
        """|W_ij| * ||X_j||_2; `calib["col_sq_norm"]` [in] = sum over tokens of x_j^2."""
        col_sq_norm = calib["col_sq_norm"]
        if col_sq_norm.shape != (weight.shape[1],):
            raise ValueError(f"col_sq_norm has shape {tuple(col_sq_norm.shape)}, expected ({weight.shape[1]},)")
        w = weight.float()
        return w.abs() * col_sq_norm.to(w.device, torch.float32).sqrt().unsqueeze(0)
