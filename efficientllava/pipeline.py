"""One loaded model + task + encoded batches + cost model: what scoring, trials and the CLI share.

Few-shot batches by task kind (no generation inside a trial):
- multiple choice: the option letters at the answer position (`prompting.encode_batches`);
- open ended: prompt + reference answer, teacher forced (`prompting.encode_answer_batches`; of
  several references, the most frequent after VQA normalisation);
- unlabelled: the same, with the DENSE model's own greedy answers as targets (generated once, at
  open, batched, at most `max_new_tokens`), marked `labelled` False; questions with options keep
  their letters and take the dense model's choice as the label. The search then runs on KL.

The held-out figure (`Pipeline.measure`) is per kind too: multiple-choice accuracy; exact match
(VQA accuracy where samples carry several answers) of greedy generated answers; agreement with the
dense model's answers for unlabelled data.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from efficientllava.config import ModelConfig
from efficientllava.data import MULTIPLE_CHOICE, OPEN_ENDED, UNLABELLED, DataConfig, TaskData, load_task
from efficientllava.errors import ConfigError
from efficientllava.models import LoadedModel, load_model
from efficientllava.prompting import encode_answer_batches, encode_batches
from efficientllava.pruning.bank import BankSpec, VariantBank, open_or_build
from efficientllava.pruning.units import num_decoder_layers
from efficientllava.scoring.accuracy import evaluate_accuracy, option_logits
from efficientllava.scoring.cost import CostModel
from efficientllava.scoring.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    GeneratedAnswers,
    encode_prompt_batches,
    generate_answers,
)
from efficientllava.scoring.objective import DEFAULT_FIDELITY, PolicyScorer
from efficientllava.scoring.srm import SRMConfig
from efficientllava.scoring.vqa_eval import agreement, normalize_answer, score_answers
from efficientllava.space import SearchSpace, check_band

SPLITS = ("fewshot", "heldout")
LABEL_FREE_FIDELITY = "kl"  # the one fidelity an unlabelled task can be searched on


def reference_answer(references: Sequence[str]) -> str:
    """The answer to teacher-force of several references: the most frequent after VQA normalisation (first on ties)."""
    counts = Counter(normalize_answer(r) for r in references)
    top = max(counts.values())
    return next(r for r in references if counts[normalize_answer(r)] == top)


def check_fidelity_for_kind(fidelity: str, kind: str, source: str) -> None:
    """An unlabelled task has no answers to be accurate on or likely under: only KL to the dense model applies."""
    if kind == UNLABELLED and fidelity != LABEL_FREE_FIDELITY:
        raise ConfigError(f"objective.fidelity: {fidelity} needs answers, but {source} is unlabelled; "
                          f"use objective.fidelity: {LABEL_FREE_FIDELITY} (agreement with the dense model)")


@dataclass(frozen=True)
class TaskMeasure:
    """The task's own figure for the model as it is now on one split (see `Pipeline.measure`)."""

    metric: str  # accuracy | exact_match | vqa_accuracy | agreement (scoring.METRIC_LABELS)
    value: float
    n: int
    seconds: float
    figures: dict[str, float]  # every figure measured, `metric` included (open ended: exact match and VQA accuracy)
    correct: int | None = None  # multiple choice: samples answered right

    @property
    def samples_per_s(self) -> float:
        """Throughput of the measurement."""
        return self.n / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Pipeline:
    """A live model with its few-shot set encoded once on its device (reused by every trial)."""

    loaded: LoadedModel
    task: TaskData
    batch_size: int
    fewshot_batches: list[dict[str, torch.Tensor]]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    _heldout: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    _prompt_batches: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)
    _dense_answers: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    @property
    def model(self) -> torch.nn.Module:
        """The loaded model."""
        return self.loaded.model

    @property
    def num_layers(self) -> int:
        """Decoder layers of the language model."""
        return num_decoder_layers(self.model)

    def split(self, name: str) -> datasets.Dataset:
        """The task's few-shot or held-out rows."""
        if name not in SPLITS:
            raise ConfigError(f"split {name!r}: use {' or '.join(SPLITS)}")
        return self.task.fewshot if name == "fewshot" else self.task.heldout

    def encode(self, dataset: datasets.Dataset) -> list[dict[str, torch.Tensor]]:
        """Encode any multiple-choice schema dataset (options) for this model."""
        return encode_batches(self.loaded.processor, dataset, self.batch_size, self.loaded.prompt_format,
                              self.loaded.device, self.loaded.dtype, family=self.loaded.family)

    def prompts(self, dataset: datasets.Dataset) -> list[str]:
        """Each row's prompt in the model's format (open ended where a row has no options)."""
        loaded = self.loaded
        return [loaded.family.prompt(loaded.processor, loaded.prompt_format, q, o, c)
                for q, o, c in zip(dataset["question"], dataset["options"], dataset["context"], strict=True)]

    def encode_split(self, split: str, batch_size: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The scoring batches of `split` for this task's kind (module docstring); unlabelled: on the DENSE model."""
        ds, size, loaded = self.split(split), batch_size or self.batch_size, self.loaded
        if self.task.has_options:
            batches = encode_batches(loaded.processor, ds, size, loaded.prompt_format, loaded.device, loaded.dtype,
                                     family=loaded.family)
            if self.task.kind == UNLABELLED:
                self._label_with_dense_choice(batches)
            return batches
        if self.task.kind == OPEN_ENDED:
            answers = [reference_answer(refs) for refs in ds["answers"]]
        else:
            answers = list(self.dense_answers(split))
        batches = encode_answer_batches(loaded.processor, ds["image"], self.prompts(ds), answers, size,
                                        loaded.device, loaded.dtype, family=loaded.family)
        if self.task.kind == UNLABELLED:
            for batch in batches:  # targets are the dense model's answers, not ground truth
                batch["labelled"] = torch.tensor(False, device=loaded.device)
        return batches

    @torch.no_grad()
    def _label_with_dense_choice(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Unlabelled questions with options: the dense model's choice becomes the label (labelled False)."""
        for batch in batches:
            choice = option_logits(self.model, batch).argmax(1)
            batch.update(labels=batch["option_ids"].gather(1, choice[:, None]).squeeze(1),
                         labelled=torch.tensor(False, device=choice.device))

    @property
    def heldout_batches(self) -> list[dict[str, torch.Tensor]]:
        """The held-out split, encoded on first use (unlabelled data: first use on the dense model)."""
        if self._heldout is None:
            self._heldout = self.encode_split("heldout")
        return self._heldout

    def batches(self, split: str) -> list[dict[str, torch.Tensor]]:
        """The scoring batches of `split` ("fewshot" or "heldout")."""
        self.split(split)  # validates the name
        return self.fewshot_batches if split == "fewshot" else self.heldout_batches

    def prompt_batches(self, split: str) -> list[dict[str, torch.Tensor]]:
        """Left-padded prompts of `split` for generation (encoded once)."""
        if split not in self._prompt_batches:
            ds, loaded = self.split(split), self.loaded
            self._prompt_batches[split] = encode_prompt_batches(loaded.processor, ds["image"], self.prompts(ds),
                                                                self.batch_size, loaded.device, loaded.dtype)
        return self._prompt_batches[split]

    def generate(self, split: str) -> GeneratedAnswers:
        """Greedy answers of the model as it is now to `split`'s prompts (at most max_new_tokens each)."""
        return generate_answers(self.model, self.loaded.processor.tokenizer, self.prompt_batches(split),
                                self.max_new_tokens)

    def dense_answers(self, split: str) -> tuple[str, ...]:
        """The dense model's greedy answers to `split` (generated on first use: call it on the dense model)."""
        if split not in self._dense_answers:
            self._dense_answers[split] = self.generate(split).answers
        return self._dense_answers[split]

    def metric(self, split: str = "heldout") -> str:
        """The figure `measure` reports for this task on `split`."""
        if self.task.kind == MULTIPLE_CHOICE:
            return "accuracy"
        if self.task.kind == UNLABELLED:
            return "agreement"
        several = any(len(refs) > 1 for refs in self.split(split)["answers"])
        return "vqa_accuracy" if several else "exact_match"

    @torch.no_grad()
    def measure(self, split: str = "heldout") -> TaskMeasure:
        """The task's figure of the model as it is now on `split`: multiple-choice accuracy; exact match of
        greedy answers after VQA normalisation (VQA accuracy where samples have several answers); agreement
        with the dense model's answers (or option choices) for unlabelled data."""
        metric = self.metric(split)
        if self.task.has_options:
            batches = self.batches(split)
            if metric == "accuracy":
                acc = evaluate_accuracy(self.model, batches)
                return TaskMeasure(metric, acc.accuracy, acc.n, acc.seconds, {metric: acc.accuracy},
                                   correct=sum(acc.correct))
            start, same = time.perf_counter(), []
            for batch in batches:  # unlabelled with options: the dense model's choice is in `labels`
                choice = option_logits(self.model, batch).argmax(1)
                same.extend((batch["option_ids"].gather(1, choice[:, None]).squeeze(1) == batch["labels"]).tolist())
            value = sum(same) / max(len(same), 1)
            return TaskMeasure(metric, value, len(same), time.perf_counter() - start, {metric: value})
        dense = self.dense_answers(split) if metric == "agreement" else ()
        generated = self.generate(split)
        if metric == "agreement":
            value = agreement(generated.answers, dense)
            return TaskMeasure(metric, value, generated.n, generated.seconds, {metric: value})
        scores = score_answers(generated.answers, self.split(split)["answers"])
        figures = {"exact_match": scores.exact_match}  # with one reference per sample VQA accuracy is the same
        if metric == "vqa_accuracy":
            figures["vqa_accuracy"] = scores.vqa_accuracy
        return TaskMeasure(metric, figures[metric], scores.n, generated.seconds, figures)

    def tokens_per_sample(self) -> int:
        """Mean LLM sequence length of the few-shot samples (image tokens included)."""
        total = sum(int(b["attention_mask"].sum()) for b in self.fewshot_batches)
        return max(1, round(total / max(1, sum(int(b["input_ids"].shape[0]) for b in self.fewshot_batches))))

    def cost_model(self, granularity: str) -> CostModel:
        """Cost model of this model at `granularity`, for samples like the few-shot ones."""
        return CostModel.from_batches(self.model, granularity, self.fewshot_batches)

    def bank_spec(self, space: SearchSpace) -> BankSpec:
        """The variant-bank spec that covers every level `space` can choose."""
        units = space.unit_names(self.num_layers)
        return BankSpec(space.granularity, tuple((u, space.levels_for(u)) for u in units), space.method,
                        space.pattern, space.method_options)

    def bank(self, space: SearchSpace, banks_dir: Path, projector_version: int = 0, log: bool = True) -> VariantBank:
        """Open the bank for (space, few-shot set, projector version) under `banks_dir`, building it once.

        The bank directory is named by a fingerprint of the spec, the checkpoint, the weights' dtype, the
        bank format and (for methods that calibrate) the few-shot set and projector version; a method
        that needs no statistics (magnitude) keeps one bank across projector updates.
        """
        return open_or_build(self.model, self.fewshot_batches, self.bank_spec(space), banks_dir,
                             source=str(self.loaded.path),
                             calibration=f"{self.task.fingerprint}/projector-{projector_version}", log=log)

    def scorer(self, space: SearchSpace, bank: VariantBank, srm: SRMConfig,
               fidelity: str = DEFAULT_FIDELITY) -> PolicyScorer:
        """A PolicyScorer on the few-shot batches (fails fast when the budget band is unreachable)."""
        check_fidelity_for_kind(fidelity, self.task.kind, self.task.source)
        cost = self.cost_model(space.granularity)
        check_band(space, space.unit_names(self.num_layers), cost.unit_param_counts())
        return PolicyScorer(self.model, self.fewshot_batches, bank, space.budget, srm, cost, fidelity)


def open_pipeline(model: ModelConfig, data: DataConfig, batch_size: int = 32, *, fidelity: str | None = None,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Pipeline:
    """Load the model and the task, and encode the few-shot set on the model's device (unlabelled data: with
    the dense model's greedy answers as targets). `fidelity`, when given, is checked against the task's kind."""
    task = load_task(data)  # first: bad data fails before minutes of model loading
    if fidelity is not None:
        check_fidelity_for_kind(fidelity, task.kind, task.source)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    loaded = load_model(model.spec, dtype=model.dtype, device=model.device)
    pipeline = Pipeline(loaded, task, batch_size, [], max_new_tokens)
    pipeline.fewshot_batches = pipeline.encode_split("fewshot")
    return pipeline
