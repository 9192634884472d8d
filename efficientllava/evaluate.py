"""`efficientllava evaluate`: accuracy, throughput and size of a model, optionally under a policy."""

from __future__ import annotations

import argparse
from pathlib import Path

from efficientllava.config import ModelConfig
from efficientllava.data import DataConfig
from efficientllava.errors import ConfigError
from efficientllava.models.tiny import home_dir
from efficientllava.pipeline import open_pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.projector import load_projector
from efficientllava.pruning.units import granularity_of, unit_names
from efficientllava.scoring.accuracy import evaluate_accuracy
from efficientllava.scoring.objective import PolicyScorer
from efficientllava.scoring.srm import SRMConfig
from efficientllava.space import Budget, SearchSpace


def policy_space(policy: PruningPolicy, method: str, pattern: str) -> SearchSpace:
    """A one-policy space: each unit's levels are {0, its ratio} (what a bank for this policy must hold).

    Its budget is a placeholder that nothing reads: `evaluate` scores without a budget.
    """
    granularity = granularity_of(policy.units)
    unit_levels = {u: tuple(sorted({0.0, r})) for u, r in policy.ratios}
    return SearchSpace(granularity=granularity, levels=(0.0,), budget=Budget(target=0.5), method=method,
                       pattern=pattern, name="evaluate").with_unit_levels(unit_levels)


def evaluate_cli(args: argparse.Namespace) -> None:
    """Run `efficientllava evaluate` and print one summary line (plus policy terms when given one)."""
    # Argument errors first: loading a 7B model only to reject --batch-size 0 would waste minutes.
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.uniform is not None and not 0.0 <= args.uniform < 1.0:
        raise ConfigError(f"--uniform {args.uniform}: a sparsity must be in [0, 1)")
    policy = PruningPolicy.load(args.policy) if args.policy is not None else None
    data = DataConfig(dataset=args.data, source=args.source, n_shots=args.n_shots, seed=args.seed,
                      heldout_size=args.heldout_size)
    pipeline = open_pipeline(ModelConfig(spec=args.model, dtype=args.dtype, device=args.device), data, args.batch_size)
    if args.projector:
        load_projector(pipeline.model, args.projector)
    batches = pipeline.heldout_batches if args.split == "heldout" else pipeline.fewshot_batches
    loaded = pipeline.loaded
    size = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    header = (f"model {args.model}: {loaded.num_parameters / 1e6:.2f} M parameters ({size / 2**20:.1f} MiB "
              f"{str(loaded.dtype).removeprefix('torch.')}) on {loaded.device}")
    if args.policy is None and args.uniform is None:
        result = evaluate_accuracy(loaded.model, batches)
        print(header)
        print(f"accuracy {result.accuracy:.4f} ({sum(result.correct)}/{result.n}) on {args.data}/{args.split}, "
              f"{result.samples_per_s:.1f} samples/s")
        return
    if policy is None:
        policy = PruningPolicy.uniform(unit_names(pipeline.num_layers, args.granularity), args.uniform)
    space = policy_space(policy, args.method, args.pattern)
    policy.validate(space.unit_names(pipeline.num_layers))
    # Calibrated on the few-shot split (as in a search); cached under $EFFICIENTLLAVA_HOME/banks.
    bank = pipeline.bank(space, Path(home_dir()) / "banks", 0, log=True)
    # No budget here: this scores one given policy, on the split asked for.
    scorer = PolicyScorer(pipeline.model, batches, bank, None, SRMConfig(), pipeline.cost_model(space.granularity))
    score = scorer.score(policy, latency=args.latency)
    print(header)
    print(f"policy {policy!r} ({args.method}, {args.pattern})")
    print(f"accuracy {score.accuracy:.4f} on {args.data}/{args.split} (n={score.n_samples}), "
          f"{score.n_samples / score.eval_s:.1f} samples/s; mean sparsity {score.mean_sparsity:.3f}, "
          f"kept {score.kept_fraction:.3f}, FLOPs speed-up {score.flops_speedup:.2f}x, SRM gap {score.gap:.4f}"
          + (f", latency {score.latency_s * 1e3:.2f} ms/sample" if score.latency_s else ""))
