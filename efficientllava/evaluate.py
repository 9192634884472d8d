"""`efficientllava evaluate` as a library call: the task's figure (accuracy, exact match, VQA accuracy or agreement
with the dense model), throughput and size of a model, optionally under a policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficientllava.config import ModelConfig
from efficientllava.data import MULTIPLE_CHOICE, DataConfig
from efficientllava.errors import ConfigError
from efficientllava.models.tiny import home_dir
from efficientllava.pipeline import TaskMeasure, open_pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.projector import load_projector
from efficientllava.pruning.units import granularity_of, unit_names
from efficientllava.scoring import METRIC_LABELS
from efficientllava.scoring.generation import DEFAULT_MAX_NEW_TOKENS
from efficientllava.scoring.objective import PolicyScorer, TrialScore
from efficientllava.scoring.srm import SRMConfig
from efficientllava.space import Budget, SearchSpace


@dataclass(frozen=True)
class EvalReport:
    """What `evaluate` measured: the model, the data split, and the task's figure (and every term under a policy).

    `metric` names the figure by the task's kind: multiple-choice `accuracy`; open-ended `exact_match`
    (or `vqa_accuracy` where samples carry several answers) of greedy answers; unlabelled `agreement`
    with the dense model's answers. `figures` holds every figure measured, `value` the main one.
    """

    model: str
    parameters: int
    size_bytes: int
    dtype: str
    device: str
    data: str
    split: str
    value: float
    n: int
    samples_per_s: float
    metric: str = "accuracy"
    kind: str = MULTIPLE_CHOICE
    figures: dict[str, float] = field(default_factory=dict)
    correct: int | None = None  # dense multiple-choice evaluation only
    policy: PruningPolicy | None = None
    method: str | None = None
    pattern: str | None = None
    score: TrialScore | None = None  # every term, under a policy
    max_new_tokens: int | None = None  # open-ended / unlabelled: the token cap of the greedy answers

    @property
    def accuracy(self) -> float:
        """The main figure (multiple-choice accuracy; see `metric` for other kinds)."""
        return self.value

    def _figure(self) -> str:
        """E.g. "exact match 0.9121" or "agreement with dense 0.9688 (the dense model's own answers)"."""
        text = f"{METRIC_LABELS[self.metric]} {self.value:.4f}"
        if self.metric == "accuracy" and self.correct is not None:
            text += f" ({self.correct}/{self.n})"
        others = [f"{METRIC_LABELS[k]} {v:.4f}" for k, v in self.figures.items() if k != self.metric]
        return text + (f" [{', '.join(others)}]" if others else "")

    def _where(self) -> str:
        greedy = f", greedy answers of at most {self.max_new_tokens} tokens" if self.max_new_tokens else ""
        return f"on {self.data}/{self.split} ({self.kind.replace('_', '-')}, n={self.n}{greedy})"

    def lines(self) -> list[str]:
        """The report as the CLI prints it."""
        header = (f"model {self.model}: {self.parameters / 1e6:.2f} M parameters ({self.size_bytes / 2**20:.1f} MiB "
                  f"{self.dtype}) on {self.device}")
        if self.score is None:
            if self.metric == "accuracy":  # the multiple-choice line scripts parse: kept as it was
                return [header, f"accuracy {self.value:.4f} ({self.correct}/{self.n}) on {self.data}/{self.split}, "
                                f"{self.samples_per_s:.1f} samples/s"]
            note = "; the dense model against its own answers" if self.metric == "agreement" else ""
            return [header, f"{self._figure()} {self._where()}, {self.samples_per_s:.1f} samples/s{note}"]
        s = self.score
        where = f"on {self.data}/{self.split} (n={s.n_samples})" if self.metric == "accuracy" else self._where()
        return [header, f"policy {self.policy!r} ({self.method}, {self.pattern})",
                f"{self._figure()} {where}, {self.samples_per_s:.1f} samples/s; mean sparsity {s.mean_sparsity:.3f}, "
                f"kept {s.kept_fraction:.3f}, FLOPs speed-up {s.flops_speedup:.2f}x, SRM gap {s.gap:.4f}, "
                f"KL to dense {s.kl:.4f}"
                + (f", latency {s.latency_s * 1e3:.2f} ms/sample" if s.latency_s else "")]


def policy_space(policy: PruningPolicy, method: str, pattern: str) -> SearchSpace:
    """A one-policy space: each unit's levels are {0, its ratio} (what a bank for this policy must hold).

    Its budget is a placeholder that nothing reads: `evaluate` scores without a budget.
    """
    granularity = granularity_of(policy.units)
    unit_levels = {u: tuple(sorted({0.0, r})) for u, r in policy.ratios}
    return SearchSpace(granularity=granularity, levels=(0.0,), budget=Budget(target=0.5), method=method,
                       pattern=pattern, name="evaluate").with_unit_levels(unit_levels)


def evaluate(*, model: ModelConfig, data: DataConfig, split: str = "heldout", batch_size: int = 32,
             policy: PruningPolicy | str | Path | None = None, uniform: float | None = None,
             method: str = "sparsegpt", pattern: str = "unstructured", granularity: str = "layer",
             projector: str | Path | None = None, latency: bool = False,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> EvalReport:
    """Evaluate `model` on `data`'s `split`: dense, under a policy (a PruningPolicy or a policy.json),
    or pruned uniformly to `uniform` at `granularity`; the bank is cached under $EFFICIENTLLAVA_HOME/banks.

    The figure follows the task's kind (see EvalReport); open-ended and unlabelled tasks generate greedy
    answers of at most `max_new_tokens` tokens (unlabelled: the dense model's first, then the policy's)."""
    # Argument errors first: loading a 7B model only to reject batch_size 0 would waste minutes.
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if uniform is not None and not 0.0 <= uniform < 1.0:
        raise ConfigError(f"--uniform {uniform}: a sparsity must be in [0, 1)")
    if split not in ("heldout", "fewshot"):
        raise ConfigError(f"--split {split!r}: use heldout or fewshot")
    if isinstance(policy, (str, Path)):
        policy = PruningPolicy.load(policy)
    pipeline = open_pipeline(model, data, batch_size, max_new_tokens=max_new_tokens)
    if projector:
        load_projector(pipeline.model, projector)
    loaded, kind = pipeline.loaded, pipeline.task.kind
    generated = not pipeline.task.has_options  # open-ended / unlabelled without options: greedy answers

    def report(measured: TaskMeasure, **extra: Any) -> EvalReport:
        return EvalReport(model=model.spec, parameters=loaded.num_parameters,
                          size_bytes=sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
                          dtype=str(loaded.dtype).removeprefix("torch."), device=str(loaded.device),
                          data=data.dataset, split=split, value=measured.value, n=measured.n,
                          samples_per_s=measured.samples_per_s, metric=measured.metric, kind=kind,
                          figures=measured.figures, max_new_tokens=max_new_tokens if generated else None, **extra)

    if policy is None and uniform is None:
        measured = pipeline.measure(split)
        return report(measured, correct=measured.correct)
    if policy is None:
        assert uniform is not None
        policy = PruningPolicy.uniform(unit_names(pipeline.num_layers, granularity), uniform)
    space = policy_space(policy, method, pattern)
    policy.validate(space.unit_names(pipeline.num_layers))
    batches = pipeline.batches(split)  # encoded now, on the dense model (unlabelled: its answers are the targets)
    if generated and pipeline.metric(split) == "agreement":
        pipeline.dense_answers(split)
    # Calibrated on the few-shot split (as in a search); cached under $EFFICIENTLLAVA_HOME/banks.
    bank = pipeline.bank(space, Path(home_dir()) / "banks", 0, log=False)
    # No budget here: this scores one given policy, on the split asked for.
    scorer = PolicyScorer(pipeline.model, batches, bank, None, SRMConfig(), pipeline.cost_model(space.granularity))
    score = scorer.score(policy, latency=latency)
    if generated:
        with scorer.materializer.applied(policy):
            measured = pipeline.measure(split)
    else:  # the scorer's accuracy is the figure (agreement with the dense choice when unlabelled)
        metric = pipeline.metric(split)
        measured = TaskMeasure(metric, score.accuracy, score.n_samples, score.eval_s, {metric: score.accuracy})
    return report(measured, policy=policy, method=method, pattern=pattern, score=score)
