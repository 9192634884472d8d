"""Projector optimisation (the paper's "search-space evolution"): train the vision projector under top policies.

Between search rounds, the vision projector (the model family's: LLaVA's `multi_modal_projector`,
Qwen2-VL's patch `merger`) is trained on the N few-shot samples
with every other parameter frozen, by gradient descent on the next-token loss of the answer letter.
The paper's objective is the upper bound of that loss over all pruning policies, which is
intractable; like the paper we average it over the current top-k policies, each materialised
from the variant bank in turn.

A projector update changes the LLM's inputs on image tokens, and therefore the calibration
statistics (Hessians, activation norms) and the SparseGPT/Wanda variants computed from them.
The bank must be rebuilt per projector version: the caller keys banks by projector version
(magnitude banks do not depend on it). The materializer used here holds the *current* version's
bank, i.e. the policies are evaluated with the variants the search scored them with.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from efficientllava.errors import ConfigError
from efficientllava.families import family_of
from efficientllava.log import get_logger
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.materialize import Materializer
from efficientllava.scoring.accuracy import answer_logits
from efficientllava.scoring.fidelity import IGNORE, answer_token_logits

logger = get_logger(__name__)

@dataclass(frozen=True)
class ProjectorResult:
    """Outcome of one projector optimisation: new weights (CPU copies) and the few-shot loss around it."""

    state_dict: dict[str, torch.Tensor]
    loss_before: float  # mean over policies of the sample-mean answer loss, before the first step
    loss_after: float  # the same, after the last step
    steps: int
    seconds: float


def projector_module(model: nn.Module) -> nn.Module:
    """The vision-to-language projector of a model, as its family names it."""
    return family_of(model).projector(model)


def projector_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the projector's state dict (keys relative to the projector)."""
    return {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in projector_module(model).state_dict().items()
    }


def save_projector(model: nn.Module, path: str | Path) -> Path:
    """Write the projector's state dict as safetensors to `path` (parents created, atomic); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(projector_state(model), str(tmp), metadata={"format": "pt", "content": "llava-projector"})
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated projector for resume to load
    return path


def load_projector(model: nn.Module, path: str | Path) -> None:
    """Load projector weights written by `save_projector` into `model` in place (its dtype and device)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"projector weights {path} do not exist; rerun the projector optimisation or fix the path"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            loaded = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as exc:
        raise ConfigError(
            f"projector weights {path} are not a readable safetensors file ({exc}); "
            "delete it and rerun the projector optimisation"
        ) from None
    target = projector_module(model).state_dict()
    missing = sorted(set(target) - set(loaded))
    unexpected = sorted(set(loaded) - set(target))
    wrong = [
        f"{k} {tuple(loaded[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k in loaded and loaded[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = (
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"unexpected {', '.join(unexpected)}"] if unexpected else [])
            + ([f"shape of {', '.join(wrong)}"] if wrong else [])
        )
        raise ConfigError(
            f"projector weights {path} do not fit this model's projector ({'; '.join(parts)}); "
            "they were saved from a different model"
        )
    with torch.no_grad():
        for key, tensor in target.items():
            tensor.copy_(loaded[key])


def _check_args(
    batches: Sequence[dict[str, torch.Tensor]],
    policies: Sequence[PruningPolicy],
    steps: int,
    lr: float,
    weight_decay: float,
) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"projector.steps {steps!r} must be an integer >= 0")
    for name, value, low_ok in (("lr", lr, False), ("weight_decay", weight_decay, True)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and not low_ok)
        ):
            raise ConfigError(f"projector.{name} {value!r} must be a number {'>= 0' if low_ok else '> 0'}")
    if not policies:
        raise ConfigError("projector optimisation needs at least one policy (the current top-k); got none")
    if not batches:
        raise ConfigError("projector optimisation needs few-shot batches; got none")
    for i, batch in enumerate(batches):
        absent = [
            k
            for k in ("input_ids", "attention_mask", "pixel_values", "answer_pos")
            if k not in batch
        ]
        if "labels" not in batch and "answer_ids" not in batch:
            absent.append("labels (or answer_ids)")
        if absent:
            raise ConfigError(
                f"few-shot batch {i} lacks {', '.join(absent)}; encode it with prompting.encode_batches "
                "(or encode_answer_batches for open-ended answers)"
            )


def _policy_loss(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], scale: float, backward: bool
) -> float:
    """Sample-mean answer loss over all batches (times `scale` in the gradient); backward per batch."""
    total = sum(int(b["input_ids"].shape[0]) for b in batches)
    value = 0.0
    for batch in batches:
        if "answer_ids" in batch:  # open ended: the answer's tokens, teacher forced (summed per sample)
            logits, _ = answer_token_logits(model, batch)
            targets = batch["answer_ids"][batch["answer_ids"] != IGNORE]
            loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        else:
            loss = nn.functional.cross_entropy(
                answer_logits(model, batch).float(), batch["labels"], reduction="sum"
            )
        if backward:
            (loss * (scale / total)).backward()  # one graph at a time: memory of one batch, not of N samples
        value += float(loss.detach()) / total
    return value


def _mean_loss(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    materializer: Materializer,
    policies: Sequence[PruningPolicy],
    backward: bool,
) -> float:
    """Loss averaged over `policies`, each materialised once; gradients accumulate when `backward`."""
    losses = []
    for policy in policies:
        materializer.apply(policy)
        with torch.set_grad_enabled(backward):
            losses.append(_policy_loss(model, batches, 1.0 / len(policies), backward))
    return sum(losses) / len(losses)


def optimize_projector(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    materializer: Materializer,
    policies: Sequence[PruningPolicy],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    log: bool = False,
) -> ProjectorResult:
    """Train the projector with AdamW on the answer loss averaged over `policies`; every other weight frozen.

    Full-batch: each step materialises every policy once and accumulates its loss over all
    `batches`, so the result is deterministic. The model leaves with its projector updated in
    place, its dense LLM weights restored bit-exactly (also on errors, when the projector is
    rolled back too), and its requires_grad flags and train/eval modes as they were. The model
    is held in eval mode while training: the scorer evaluates it so, and dropout in the frozen
    LLM would only add noise to the loss.
    """
    _check_args(batches, policies, steps, lr, weight_decay)
    start = time.perf_counter()
    projector = projector_module(model)
    params = list(projector.parameters())
    trainable = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    backup = {k: v.detach().clone() for k, v in projector.state_dict().items()}
    # Low-precision models (bf16 on GPU) keep fp32 master weights: AdamW steps on bf16 round away.
    masters = (
        params
        if all(p.dtype == torch.float32 for p in params)
        else [p.detach().float().clone() for p in params]
    )
    ok = False
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in trainable)
        model.eval()
        opt = torch.optim.AdamW(masters, lr=lr, weight_decay=weight_decay)
        every = max(1, steps // 10)
        loss_before = None
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            for p in params:
                p.grad = None
            loss = _mean_loss(model, batches, materializer, policies, backward=True)
            if loss_before is None:
                loss_before = loss  # step 0's loss is with the untouched projector: no extra pass
            if masters is not params:
                for m, p in zip(masters, params, strict=True):
                    m.grad = p.grad.float() if p.grad is not None else None
            opt.step()
            if masters is not params:
                with torch.no_grad():
                    for m, p in zip(masters, params, strict=True):
                        p.copy_(m)
            if log and (step % every == 0 or step == steps - 1):
                logger.info(
                    f"projector step {step + 1}/{steps}: loss {loss:.4f} "
                    f"({len(policies)} policies, {time.perf_counter() - start:.1f}s)"
                )
        loss_after = _mean_loss(model, batches, materializer, policies, backward=False)
        if loss_before is None:
            loss_before = loss_after
        ok = True
    finally:
        materializer.restore()
        for p in params:
            p.grad = None
        if not ok:
            with torch.no_grad():
                for key, tensor in projector.state_dict().items():
                    tensor.copy_(backup[key])
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
    seconds = time.perf_counter() - start
    if log:
        logger.info(f"projector: {steps} steps: loss {loss_before:.4f} -> {loss_after:.4f} in {seconds:.1f}s")
    return ProjectorResult(projector_state(model), loss_before, loss_after, steps, seconds)
