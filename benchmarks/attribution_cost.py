"""What the guided sampler's attributions cost per trial, on LLaVA-1.5-7B-shaped decoder layers.

    python benchmarks/attribution_cost.py [--layers 2] [--device cpu] [--shots 16] [--repeats 5] [--out F]

Builds a random-weight LLaVA whose decoder layers have LLaVA-1.5-7B's shape (hidden 4096, MLP 11008; the
tiny model's tokenizer and image processor, so the synthetic task runs: `gpu_smoke.build_checkpoint`),
saves it with `save_pretrained`, loads it through the pipeline, builds a magnitude bank of sublayer
units, and scores one uniform 50% policy on the few-shot set the way a trial does, without and with
the KL attribution (`PolicyScorer.score(policy, attribution=True)`, one backward pass into the pruned
linears' weights). Prints the median seconds of each over `--repeats` scorings (after a warm-up) with
their spread, the ratio, and the memory the attribution adds: its gradient (the size of the prunable
linears, in the model's dtype) measured as peak GPU memory on CUDA, computed from the weights on CPU.
Per-token cost scales with the layers' shape, not their count, so the ratio carries to a 32-layer 7B.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_smoke import _sync, build_checkpoint  # noqa: E402


def measure(args: argparse.Namespace) -> list[str]:
    """Run the measurement; the report lines."""
    from efficientllava.config import ModelConfig
    from efficientllava.data import DataConfig
    from efficientllava.pipeline import open_pipeline
    from efficientllava.policy import PruningPolicy
    from efficientllava.pruning.bank import BankSpec, build_bank
    from efficientllava.pruning.units import prunable_units
    from efficientllava.scoring.objective import PolicyScorer
    from efficientllava.scoring.srm import SRMConfig

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory(prefix="attribution") as tmp:
        work = Path(tmp)
        params = build_checkpoint(work / "ckpt", False, args.layers, dtype)
        pipe = open_pipeline(ModelConfig(spec=str(work / "ckpt"), dtype=str(dtype).removeprefix("torch."),
                                         device=args.device), DataConfig(n_shots=args.shots, heldout_size=16),
                             batch_size=args.batch)
        dev = pipe.loaded.device
        units = prunable_units(pipe.model, "sublayer")
        spec = BankSpec("sublayer", tuple((u.name, (0.0, 0.5)) for u in units), "magnitude")
        bank = build_bank(pipe.model, pipe.fewshot_batches, spec, work / "bank")
        bank.preload(dev)
        scorer = PolicyScorer(pipe.model, pipe.fewshot_batches, bank, None, SRMConfig(), pipe.cost_model("sublayer"))
        policy = PruningPolicy.uniform([u.name for u in units], 0.5)
        grad_bytes = sum(pipe.model.get_submodule(n).weight.numel() * pipe.model.get_submodule(n).weight.element_size()
                         for u in units for n in u.linears)
        times: dict[bool, list[float]] = {False: [], True: []}
        peak: dict[bool, float] = {}
        for attribution in (False, True):
            scorer.score(policy, attribution=attribution)  # warm-up
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            for _ in range(args.repeats):
                _sync(dev)
                t0 = time.perf_counter()
                scorer.score(policy, attribution=attribution)
                _sync(dev)
                times[attribution].append(time.perf_counter() - t0)
            if dev.type == "cuda":
                peak[attribution] = torch.cuda.max_memory_allocated(dev)
    plain, split = statistics.median(times[False]), statistics.median(times[True])

    def spread(xs: list[float]) -> str:
        return f"{statistics.median(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f})"

    lines = [
        f"model: {params / 1e6:.0f} M parameters, {args.layers} x (4096, 11008) decoder layers, {dtype}, {dev}; "
        f"{args.shots} few-shot samples, batch {args.batch}; {args.repeats} scorings each, after a warm-up",
        f"trial without attribution: {spread(times[False])}",
        f"trial with attribution:    {spread(times[True])}",
        f"ratio: {split / plain:.2f}x (the backward pass into the pruned linears' weights)",
    ]
    if peak:
        lines.append(f"peak GPU memory: {peak[False] / 2**30:.2f} GiB -> {peak[True] / 2**30:.2f} GiB "
                     f"(+{(peak[True] - peak[False]) / 2**30:.2f} GiB; gradient {grad_bytes / 2**30:.2f} GiB)")
    else:
        lines.append(f"added memory: the gradient, {grad_bytes / 2**30:.2f} GiB here ({grad_bytes / args.layers / 2**20:.0f} "
                     f"MiB per layer: {32 * grad_bytes / args.layers / 2**30:.1f} GiB for a 32-layer 7B in this dtype), "
                     "plus one batch's activations")
    return lines


def main() -> None:
    """Parse the options, measure, print (and write with --out)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the lines to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = measure(args)
    print("\n".join(lines))
    if args.out:
        command = "python benchmarks/attribution_cost.py " + " ".join(a for a in sys.argv[1:] if a != args.out
                                                                       and a != "--out")
        Path(args.out).write_text(f"Generated by `{command.strip()}` on {time.strftime('%Y-%m-%d')}.\n\n"
                                  + "\n".join(f"- {line}" for line in lines) + "\n")


if __name__ == "__main__":
    main()
