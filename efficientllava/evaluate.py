"""`efficientllava evaluate` as a library call: accuracy, throughput and size of a model, optionally under a policy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from efficientllava.config import ModelConfig
from efficientllava.data import DataConfig
from efficientllava.errors import ConfigError
from efficientllava.models.tiny import home_dir
from efficientllava.pipeline import open_pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.projector import load_projector
from efficientllava.pruning.units import granularity_of, unit_names
from efficientllava.scoring.accuracy import evaluate_accuracy
from efficientllava.scoring.objective import PolicyScorer, TrialScore
from efficientllava.scoring.srm import SRMConfig
from efficientllava.space import Budget, SearchSpace


@dataclass(frozen=True)
class EvalReport:
    """What `evaluate` measured: the model, the data split, and the accuracy (and score under a policy)."""

    model: str
    parameters: int
    size_bytes: int
    dtype: str
    device: str
    data: str
    split: str
    accuracy: float
    n: int
    samples_per_s: float
    correct: int | None = None  # dense evaluation only
    policy: PruningPolicy | None = None
    method: str | None = None
    pattern: str | None = None
    score: TrialScore | None = None  # every term, under a policy

    def lines(self) -> list[str]:
        """The report as the CLI prints it."""
        header = (f"model {self.model}: {self.parameters / 1e6:.2f} M parameters ({self.size_bytes / 2**20:.1f} MiB "
                  f"{self.dtype}) on {self.device}")
        if self.score is None:
            return [header, f"accuracy {self.accuracy:.4f} ({self.correct}/{self.n}) on {self.data}/{self.split}, "
                            f"{self.samples_per_s:.1f} samples/s"]
        s = self.score
        return [header, f"policy {self.policy!r} ({self.method}, {self.pattern})",
                f"accuracy {s.accuracy:.4f} on {self.data}/{self.split} (n={s.n_samples}), "
                f"{self.samples_per_s:.1f} samples/s; mean sparsity {s.mean_sparsity:.3f}, "
                f"kept {s.kept_fraction:.3f}, FLOPs speed-up {s.flops_speedup:.2f}x, SRM gap {s.gap:.4f}"
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
             projector: str | Path | None = None, latency: bool = False) -> EvalReport:
    """Evaluate `model` on `data`'s `split`: dense, under a policy (a PruningPolicy or a policy.json),
    or pruned uniformly to `uniform` at `granularity`; the bank is cached under $EFFICIENTLLAVA_HOME/banks."""
    # Argument errors first: loading a 7B model only to reject batch_size 0 would waste minutes.
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    if uniform is not None and not 0.0 <= uniform < 1.0:
        raise ConfigError(f"--uniform {uniform}: a sparsity must be in [0, 1)")
    if split not in ("heldout", "fewshot"):
        raise ConfigError(f"--split {split!r}: use heldout or fewshot")
    if isinstance(policy, (str, Path)):
        policy = PruningPolicy.load(policy)
    pipeline = open_pipeline(model, data, batch_size)
    if projector:
        load_projector(pipeline.model, projector)
    batches = pipeline.heldout_batches if split == "heldout" else pipeline.fewshot_batches
    loaded = pipeline.loaded
    def report(**measured: Any) -> EvalReport:
        return EvalReport(model=model.spec, parameters=loaded.num_parameters,
                          size_bytes=sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
                          dtype=str(loaded.dtype).removeprefix("torch."), device=str(loaded.device),
                          data=data.dataset, split=split, **measured)

    if policy is None and uniform is None:
        result = evaluate_accuracy(loaded.model, batches)
        return report(accuracy=result.accuracy, n=result.n, samples_per_s=result.samples_per_s,
                      correct=sum(result.correct))
    if policy is None:
        assert uniform is not None
        policy = PruningPolicy.uniform(unit_names(pipeline.num_layers, granularity), uniform)
    space = policy_space(policy, method, pattern)
    policy.validate(space.unit_names(pipeline.num_layers))
    # Calibrated on the few-shot split (as in a search); cached under $EFFICIENTLLAVA_HOME/banks.
    bank = pipeline.bank(space, Path(home_dir()) / "banks", 0, log=False)
    # No budget here: this scores one given policy, on the split asked for.
    scorer = PolicyScorer(pipeline.model, batches, bank, None, SRMConfig(), pipeline.cost_model(space.granularity))
    score = scorer.score(policy, latency=latency)
    return report(accuracy=score.accuracy, n=score.n_samples, samples_per_s=score.n_samples / score.eval_s,
                  policy=policy, method=method, pattern=pattern, score=score)
