"""Which units a pruned model's damage comes from: its KL to the dense model, split per unit.

KL(dense || pruned) as a function of the weights is 0, with zero gradient, at the dense weights, so
to second order KL(W + dW) ~ 1/2 dW^T F dW = 1/2 <grad KL(W + dW), dW>. One backward pass at the
pruned model therefore splits its KL into a term per unit, 1/2 <grad_u KL, dW_u> (the unit's
linears' gradients dotted with their pruning deltas), which sums to that quadratic estimate. The
guided sampler (`search.samplers.guided`) turns these terms into each unit's sensitivity.

Integrated gradients along the path from dense to pruned would split the KL exactly, at one backward
pass per quadrature point; on the tiny model at matrix granularity the endpoint rule steered the
search better (24 trials, 5 few-shot draws, 94% budget: held-out 99.7% against 98.6% for two points)
and costs a single backward pass. Gradients exist for the units' weights only (the rest of the
model, vision tower and projector included, stays frozen), so the memory is one gradient the size of
the prunable weights, plus the activations of one evaluation batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from efficientllava.scoring.fidelity import DenseReference, FidelityResult, evaluate_fidelity


def kl_attributions(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], reference: DenseReference,
                    weights: Mapping[str, torch.Tensor], dense: Mapping[str, torch.Tensor],
                    unit_linears: Mapping[str, Sequence[str]]) -> tuple[dict[str, float], FidelityResult]:
    """`{unit: 1/2 <grad_u KL, W_u - dense_u>}` for the model as it stands (the pruned weights in `weights`),
    and the fidelity signals of the same forward pass (what `evaluate_fidelity` gives)."""
    params = {n: weights[n] for names in unit_linears.values() for n in names}
    before = [(param, param.requires_grad) for param in model.parameters()]
    # fp16 gradients of a KL of 1e-3 underflow: scale the loss up (AMP's loss scaling), and back off if it overflows.
    half = any(w.dtype == torch.float16 for w in params.values())
    try:
        for param, _ in before:
            param.requires_grad_(False)
        for w in params.values():
            w.requires_grad_(True)
        for scale in ((FP16_LOSS_SCALE, 1.0) if half else (1.0,)):
            for w in params.values():
                w.grad = None
            factor = scale / max(reference.n, 1)

            def backward(kl: torch.Tensor, factor: float = factor) -> None:
                (kl * factor).backward()

            result = evaluate_fidelity(model, list(batches), reference, backward=backward)
            shares = {unit: 0.5 * math.fsum(_dot(params[n], dense[n]) for n in names) / scale
                      for unit, names in unit_linears.items()}
            if all(math.isfinite(v) for v in shares.values()):
                break
        return shares, result
    finally:
        for w in params.values():
            w.grad = None
        for param, flag in before:
            param.requires_grad_(flag)


FP16_LOSS_SCALE = 1024.0


def _dot(weight: torch.Tensor, dense: torch.Tensor) -> float:
    """<weight.grad, weight - dense> in fp32 (0 when the weight got no gradient)."""
    if weight.grad is None:  # not on the answer's path (cannot happen in a decoder)
        return 0.0
    delta = (weight.detach() - dense.to(weight.device)).reshape(-1)
    return float(torch.dot(weight.grad.reshape(-1).float(), delta.float()))
