"""Layer-wise reconstruction error of every bank variant: what an error-sum allocation minimises.

OBC (Frantar & Alistarh, NeurIPS 2022) and SPDY (Frantar & Alistarh, ICML 2022) allocate sparsity
across layers from each layer's own output error on calibration inputs, ||(W - W_hat) X||^2 =
tr(dW H dW^T) with H = X^T X, summed over the layers: a non-uniform allocation that costs no
evaluation of the model, only the variants the bank holds already. `allocations.error_dp` turns
the table this module computes into a policy at the budget.

Inputs X are the dense model's (one forward of the few-shot set per decoder layer, as the bank's
own calibration), so the table is a property of the bank, computed once per bank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from efficientllava.pruning.bank.base import VariantBank, linear_weight
from efficientllava.pruning.calibrate import collect_stats
from efficientllava.pruning.units import PrunableUnit


@torch.no_grad()
def reconstruction_errors(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], bank: VariantBank,
                          units: Sequence[PrunableUnit]) -> dict[str, dict[float, float]]:
    """`{unit: {level: sum over its linears of tr(dW H dW^T)}}` for every level the bank holds (0 at level 0)."""
    by_layer: dict[int, list[PrunableUnit]] = {}
    for unit in units:
        by_layer.setdefault(unit.layer, []).append(unit)
    out: dict[str, dict[float, float]] = {}
    for layer_units in by_layer.values():  # one decoder layer's Hessians at a time bounds memory
        names = [n for u in layer_units for n in u.linears]
        stats = collect_stats(model, batches, names, need_hessian=True)
        for unit in layer_units:
            dense = {n: linear_weight(model, n) for n in unit.linears}
            errors: dict[float, float] = {}
            for level in bank.unit_levels[unit.name]:
                if level == 0.0:
                    errors[level] = 0.0
                    continue
                variant = bank.variant(unit.name, level, dense)
                total = 0.0
                for n in unit.linears:
                    hessian = stats[n].hessian
                    assert hessian is not None  # need_hessian=True
                    dw = (variant[n].float() - dense[n].float()).to(hessian.device)
                    total += float(((dw @ hessian) * dw).sum())
                errors[level] = total
            out[unit.name] = errors
        del stats
    return out
