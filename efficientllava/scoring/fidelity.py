"""Few-shot fidelity of a (pruned) model: accuracy, soft accuracy, log-likelihood and KL to the dense model.

Every signal comes from ONE forward pass per batch, so the search can record all of them in
every trial and rank policies by whichever `objective.fidelity` names:

- "accuracy": share of samples answered right (ties on 64 samples: steps of 1/64, and it
  saturates at 1.0 on easy tasks, so it cannot rank good policies);
- "loglik": mean log-likelihood of the right answer (smooth; needs labels);
- "kl": mean KL(dense || pruned) of the answer distributions, label free (EvoPress's fitness);
  the objective maximises its negative.

Two batch kinds (see `efficientllava.prompting`):
- multiple choice (`option_ids`): the distribution is the softmax over the sample's option
  letters at the answer position (`scoring.accuracy.option_logits`); the target is `answers`
  (the right option's index). A batch without `answers` is unlabelled: the dense model's own
  choice is the target, so accuracy reads as agreement with the dense model (`labelled` False).
  Either kind may carry `labelled` (a 0-dim bool tensor): False marks targets that are not
  ground truth (e.g. the dense model's own generated answers of an unlabelled open-ended set).
- open ended (`answer_ids`: answer tokens then EOS, -100 padding; position `answer_pos + j`
  predicts `answer_ids[:, j]`): teacher forced, the next-token distributions over the whole
  vocabulary at the answer positions. Log-likelihood is the answer's (sum over its tokens),
  KL is summed over its tokens, accuracy is exact match of every token (what greedy decoding
  would produce), soft accuracy the answer's probability. No option letters are assumed.

The dense model's distributions are computed once per batch list (`dense_reference`) and
reused for every policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from efficientllava.errors import ConfigError
from efficientllava.prompting import model_inputs
from efficientllava.scoring import FIDELITIES
from efficientllava.scoring.accuracy import option_logits

__all__ = ["FIDELITIES", "DenseReference", "FidelityResult", "dense_reference", "evaluate_fidelity"]
IGNORE = -100  # padding in answer_ids


@dataclass(frozen=True)
class FidelityResult:
    """Every fidelity signal of a model on a set of batches (means over samples)."""

    accuracy: float  # share right (agreement with the dense model when unlabelled)
    soft_accuracy: float  # mean probability of the right answer
    loglik: float  # mean log-likelihood of the right answer (nats; <= 0)
    kl: float  # mean KL(dense || model) of the answer distributions (nats; >= 0)
    n: int
    seconds: float
    correct: tuple[bool, ...] = ()
    labelled: bool = True

    def value(self, fidelity: str) -> float:
        """The signal `fidelity` names, oriented so that higher is better (KL is negated)."""
        check_fidelity(fidelity)
        return {"accuracy": self.accuracy, "loglik": self.loglik, "kl": -self.kl}[fidelity]

    @property
    def samples_per_s(self) -> float:
        """Throughput of the evaluation."""
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def check_fidelity(fidelity: str) -> str:
    """`fidelity` itself, or a one-line ConfigError naming the choices."""
    if fidelity not in FIDELITIES:
        raise ConfigError(f"objective.fidelity={fidelity!r} is not one of {', '.join(FIDELITIES)}")
    return fidelity


def batch_kind(batch: dict[str, torch.Tensor]) -> str:
    """"choice" for a multiple-choice batch (option_ids), "open" for an open-ended one (answer_ids)."""
    if "option_ids" in batch:
        return "choice"
    if "answer_ids" in batch:
        return "open"
    raise ConfigError("a scoring batch needs option_ids (multiple choice) or answer_ids (open ended); "
                      "encode it with prompting.encode_batches or encode_answer_batches")


def answer_token_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n_tokens, vocab] at every answer position, the row's sample index [n_tokens]), one forward.

    Position `answer_pos + j` predicts `answer_ids[:, j]`; only positions with a target are fed to
    lm_head (rows in sample-major order, as `answer_ids[answer_ids != -100]`).
    """
    hidden = model.model(**model_inputs(batch)).last_hidden_state
    targets = batch["answer_ids"]
    valid = targets != IGNORE
    pos = batch["answer_pos"][:, None] + torch.arange(targets.shape[1], device=targets.device)[None, :]
    sample = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
    rows = hidden[sample[valid], pos[valid].clamp(max=hidden.shape[1] - 1)]
    return model.lm_head(rows).float(), sample[valid]


@dataclass(frozen=True)
class _Reference:
    """The dense model's log-probabilities on one batch, and the batch's targets."""

    logprobs: torch.Tensor  # choice: [batch, options] (-inf beyond a sample's options); open: [tokens, vocab]
    targets: torch.Tensor  # choice: [batch] option index; open: [tokens] token ids
    labelled: bool


@dataclass(frozen=True)
class DenseReference:
    """The dense model's answer distributions on a fixed list of batches (computed once, reused)."""

    batches: tuple[_Reference, ...]
    n: int

    @property
    def labelled(self) -> bool:
        """Whether every batch carries its own answers."""
        return all(b.labelled for b in self.batches)


def _choice_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.log_softmax(option_logits(model, batch), dim=1)


def _open_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.log_softmax(answer_token_logits(model, batch)[0], dim=1)


@torch.no_grad()
def dense_reference(model: Any, batches: list[dict[str, torch.Tensor]]) -> DenseReference:
    """The dense model's distributions and targets on `batches` (run on the unpruned model)."""
    out: list[_Reference] = []
    n = 0
    for batch in batches:
        if batch_kind(batch) == "choice":
            logprobs = _choice_logprobs(model, batch)
            labelled = "answers" in batch
            targets = batch["answers"] if labelled else logprobs.argmax(1)
            n += logprobs.shape[0]
        else:
            logprobs = _open_logprobs(model, batch)
            labelled = True
            targets = batch["answer_ids"][batch["answer_ids"] != IGNORE]
            n += batch["answer_ids"].shape[0]
        if "labelled" in batch:
            labelled = labelled and bool(batch["labelled"])
        out.append(_Reference(logprobs, targets, labelled))
    return DenseReference(tuple(out), n)


def _kl_rows(ref: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """KL(ref || new) per row of log-probabilities; entries where ref is -inf (probability 0) add nothing."""
    p = ref.exp()
    terms = torch.where(torch.isfinite(ref), p * (ref - new), torch.zeros_like(ref))
    return terms.sum(1)


def evaluate_fidelity(model: Any, batches: list[dict[str, torch.Tensor]], reference: DenseReference,
                      backward: Callable[[torch.Tensor], None] | None = None) -> FidelityResult:
    """Every fidelity signal of `model` on `batches` against the dense `reference` of the same batches.

    With `backward`, the forward runs with gradients and `backward(kl)` is called on each batch's summed
    KL tensor (`scoring.attribution` puts its backward pass on this same forward).
    """
    if len(reference.batches) != len(batches):
        raise ValueError(f"the dense reference covers {len(reference.batches)} batches, not {len(batches)}")
    start = time.perf_counter()
    correct: list[bool] = []
    loglik: list[float] = []
    kl: list[float] = []
    for batch, ref in zip(batches, reference.batches, strict=True):
        kind = batch_kind(batch)
        with torch.enable_grad() if backward is not None else torch.no_grad():
            if kind == "choice":
                logprobs = _choice_logprobs(model, batch)
                rows = _kl_rows(ref.logprobs, logprobs)
            else:
                logits, sample = answer_token_logits(model, batch)
                logprobs = torch.log_softmax(logits, dim=1)
                rows = _kl_rows(ref.logprobs, logprobs)
            if backward is not None:
                backward(rows.sum())
        logprobs, rows = logprobs.detach(), rows.detach()
        if kind == "choice":
            picked = logprobs.gather(1, ref.targets[:, None]).squeeze(1)
            correct.extend((logprobs.argmax(1) == ref.targets).tolist())
            loglik.extend(picked.tolist())
            kl.extend(rows.tolist())
        else:
            size = batch["answer_ids"].shape[0]
            token_ll = logprobs.gather(1, ref.targets[:, None]).squeeze(1)
            wrong = (logprobs.argmax(1) != ref.targets).float()
            sums = torch.zeros(3, size, device=logprobs.device)
            sums[0].index_add_(0, sample, token_ll)
            sums[1].index_add_(0, sample, rows)
            sums[2].index_add_(0, sample, wrong)
            loglik.extend(sums[0].tolist())
            kl.extend(sums[1].tolist())
            correct.extend((sums[2] == 0).tolist())
    if batches and batches[0]["input_ids"].is_cuda:
        torch.cuda.synchronize()
    n = len(correct)
    denom = max(n, 1)
    return FidelityResult(
        accuracy=sum(correct) / denom,
        soft_accuracy=math.fsum(math.exp(x) for x in loglik) / denom,
        loglik=math.fsum(loglik) / denom,
        kl=max(0.0, math.fsum(kl) / denom),  # rounding can leave -1e-9 for identical models
        n=n,
        seconds=time.perf_counter() - start,
        correct=tuple(correct),
        labelled=reference.labelled,
    )
