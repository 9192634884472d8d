"""Multiple-choice accuracy from one forward pass per sample: the highest option-letter logit wins."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from efficientllava.families import family_of


@dataclass(frozen=True)
class AccuracyResult:
    """Accuracy of a model on a set of encoded batches, with throughput."""

    accuracy: float
    n: int
    correct: tuple[bool, ...]
    seconds: float
    soft_accuracy: float = float("nan")  # mean probability of the right option (softmax over the options)

    @property
    def samples_per_s(self) -> float:
        """Throughput of the evaluation."""
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def answer_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Vocabulary logits at each sample's answer position, [batch, vocab] (lm_head on those rows only)."""
    return family_of(model).answer_logits(model, batch)


def option_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of each sample's option letters, [batch, max_options]; -inf where a sample has fewer options."""
    logits = answer_logits(model, batch).float()
    ids = batch["option_ids"]
    picked = logits.gather(1, ids.clamp(min=0))
    return picked.masked_fill(ids < 0, float("-inf"))


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> AccuracyResult:
    """Accuracy of `model` over pre-encoded `batches` (see prompting.encode_batches)."""
    start = time.perf_counter()
    correct: list[bool] = []
    prob = 0.0
    for batch in batches:
        logits = option_logits(model, batch)
        correct.extend((logits.argmax(1) == batch["answers"]).tolist())
        prob += float(logits.softmax(1).gather(1, batch["answers"][:, None]).sum())
    if batches and batches[0]["input_ids"].is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = max(len(correct), 1)
    return AccuracyResult(sum(correct) / n, len(correct), tuple(correct), seconds, prob / n)
