"""Materialising a policy from the variant bank vs. pruning it from scratch with SparseGPT.

    python benchmarks/materialize.py [--model tiny] [--space search_spaces/tiny.yaml] [--repeats 20]

Prints the bank's build time and disk size, then the time per policy of (a) a bank swap + restore
and (b) calibrate + SparseGPT-prune the same policy from scratch, and their ratio, in one run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from efficientllava.config import ModelConfig
from efficientllava.data import DataConfig
from efficientllava.pipeline import open_pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.bank import bank_bytes, build_bank
from efficientllava.pruning.calibrate import collect_stats
from efficientllava.pruning.materialize import Materializer
from efficientllava.pruning.methods import prune_weight
from efficientllava.pruning.units import prunable_units
from efficientllava.space import load_space, repair


def prune_from_scratch(model: torch.nn.Module, batches, policy: PruningPolicy, space) -> None:
    """What a trial would do without a bank: calibrate the touched linears, then prune them."""
    units = {u.name: u for u in prunable_units(model, space.granularity)}
    names = [n for u, r in policy.ratios if r > 0 for n in units[u].linears]
    method = space.pruning_method
    stats = collect_stats(model, batches, names, need_hessian=method.stats == "hessian") if method.stats != "none" \
        else {}
    with torch.no_grad():
        for unit, ratio in policy.ratios:
            for name in units[unit].linears if ratio > 0 else ():
                w = model.get_submodule(name).weight
                w.copy_(prune_weight(method, w.data, stats.get(name), ratio, space.pattern))


def main() -> None:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--space", default=str(Path(__file__).parents[1] / "search_spaces" / "tiny.yaml"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = open_pipeline(ModelConfig(spec=args.model), DataConfig(), batch_size=64)
    space = load_space(args.space)
    units = space.unit_names(pipe.num_layers)
    weights = pipe.cost_model(space.granularity).unit_param_counts()
    rng = random.Random(0)
    policies = [repair(PruningPolicy(tuple((u, rng.choice(space.levels_for(u))) for u in units)), space, weights)
                for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bank = build_bank(pipe.model, pipe.fewshot_batches, pipe.bank_spec(space), Path(tmp) / "bank", eager=True)
        build_s = time.perf_counter() - t0
        size = bank_bytes(bank.root)
        bank.preload(pipe.loaded.device)
        mat = Materializer(pipe.model, bank)
        swap = []
        for p in policies:
            t0 = time.perf_counter()
            mat.apply(p)
            mat.restore()
            swap.append(time.perf_counter() - t0)
        dense = {k: v.clone() for k, v in pipe.model.state_dict().items()}
        scratch = []
        for p in policies[: max(3, args.repeats // 4)]:
            t0 = time.perf_counter()
            prune_from_scratch(pipe.model, pipe.fewshot_batches, p, space)
            scratch.append(time.perf_counter() - t0)
            pipe.model.load_state_dict(dense)
    n_variants = sum(1 for u in units for lv in space.levels_for(u) if lv > 0)
    swap_s, scratch_s = statistics.median(swap), statistics.median(scratch)
    print(f"model {args.model}, space {space.name} ({len(units)} units, {n_variants} variants, {space.method})")
    print(f"bank build: {build_s:.2f} s, {size / 2**20:.2f} MiB on disk")
    print(f"materialise + restore from bank: {swap_s * 1e3:.2f} ms/policy (median of {len(swap)})")
    print(f"calibrate + {space.method} from scratch: {scratch_s * 1e3:.1f} ms/policy (median of {len(scratch)})")
    print(f"speed-up of the bank: {scratch_s / swap_s:.0f}x; bank pays for itself after "
          f"{build_s / max(scratch_s - swap_s, 1e-9):.1f} policies")


if __name__ == "__main__":
    main()
