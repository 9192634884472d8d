"""Held-out accuracy of uniform SparseGPT, Wanda and magnitude pruning at one sparsity (tiny model).

    python benchmarks/methods.py [--sparsity 0.5] [--model tiny] [--pattern unstructured]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from efficientllava.config import ModelConfig
from efficientllava.data import DataConfig
from efficientllava.pipeline import open_pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.bank import BankSpec, build_bank
from efficientllava.pruning.materialize import Materializer
from efficientllava.pruning.methods import method_names
from efficientllava.pruning.units import unit_names
from efficientllava.scoring.accuracy import evaluate_accuracy


def main() -> None:
    """Run the benchmark and print one line per method."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--granularity", default="layer")
    ap.add_argument("--seeds", type=int, default=3, help="few-shot (calibration) draws")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, list[float]] = {m: [] for m in method_names()}
    dense = None
    for seed in range(args.seeds):
        pipe = open_pipeline(ModelConfig(spec=args.model), DataConfig(seed=seed, heldout_size=1024), batch_size=64)
        if dense is None:
            dense = evaluate_accuracy(pipe.model, pipe.heldout_batches).accuracy
        units = unit_names(pipe.num_layers, args.granularity)
        policy = PruningPolicy.uniform(units, args.sparsity)
        for method in method_names():
            spec = BankSpec(args.granularity, tuple((u, (0.0, args.sparsity)) for u in units), method, args.pattern)
            with tempfile.TemporaryDirectory() as tmp:
                bank = build_bank(pipe.model, pipe.fewshot_batches, spec, Path(tmp) / "bank")
                with Materializer(pipe.model, bank).applied(policy):
                    rows[method].append(evaluate_accuracy(pipe.model, pipe.heldout_batches).accuracy)
    print(f"model {args.model}: dense held-out accuracy {dense:.4f} (n=1024)")
    for method, accs in rows.items():
        mean = sum(accs) / len(accs)
        print(f"uniform {args.sparsity:.0%} {args.pattern} {method:9s}: held-out accuracy {mean:.4f} "
              f"(min {min(accs):.4f}, max {max(accs):.4f} over {len(accs)} calibration draws of 64 samples)")


if __name__ == "__main__":
    main()
