"""Magnitude pruning: drop the smallest |W| (one threshold for the whole matrix, or N:M)."""

from __future__ import annotations

from torch import Tensor

from efficientllava.pruning.methods.base import Calibration, NestedMethod, register_method


@register_method
class Magnitude(NestedMethod):
    """Magnitude: |W|, no calibration; exactly floor(sparsity * numel) zeros per matrix."""

    name = "magnitude"
    stats = "none"
    scope = "matrix"

    def saliency(self, weight: Tensor, calib: Calibration) -> Tensor:
        """|W| in float32."""
        return weight.float().abs()
