"""Does one projector-optimisation round raise the held-out accuracy of the best pruned policy?

    python benchmarks/projector_round.py [--seeds 3] [--candidates 60] [--steps 40] [--lr 1e-3]

For each seed of the few-shot draw: ~60 random level choices per unit, repaired onto the tiny
space's budget, are scored on the few-shot set (accuracy - SRM gap, bank of projector v0); the
top-3 by objective are the projector's training policies (the experiment's projector.top_k), and
the best one is the policy followed. Then `optimize_projector` trains the projector under the
top-3 (the experiment's steps and lr), and the SAME policies are evaluated on the held-out set
(a) with the same pruned weights and the new projector, and (b) re-pruned from a bank rebuilt with
the new projector (projector v1: what the next search round uses, since a projector update changes
the calibration inputs). Prints per seed and mean +- std over seeds: held-out and few-shot accuracy
of the best policy (and the top-3 mean) before / after (a) / after (b), the dense model's held-out
accuracy before/after, and the projector's few-shot loss before/after.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from candidates import draw, mean_std, seed_pipeline

from efficientllava.config import load_config
from efficientllava.policy import PruningPolicy
from efficientllava.problem import srm_config
from efficientllava.projector import optimize_projector
from efficientllava.pruning.materialize import Materializer
from efficientllava.scoring.accuracy import evaluate_accuracy

ROOT = Path(__file__).parents[1]
VARIANTS = ("before", "same_weights", "repruned")
LABELS = {
    "before": "original projector, bank v0",
    "same_weights": "new projector, same pruned weights (bank v0)",
    "repruned": "new projector, re-pruned (bank v1)",
}


def accuracy(
    model: torch.nn.Module,
    materializer: Materializer | None,
    policy: PruningPolicy | None,
    batches: list[dict[str, torch.Tensor]],
) -> float:
    """Accuracy of `policy` materialised by `materializer` (dense when None) on `batches`."""
    if materializer is None or policy is None:
        return evaluate_accuracy(model, batches).accuracy
    with materializer.applied(policy):
        return evaluate_accuracy(model, batches).accuracy


def main() -> None:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=str(ROOT / "experiments" / "tiny.yaml"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=60, help="random draws per seed (before dedupe)")
    ap.add_argument("--shots", type=int, default=64)
    ap.add_argument("--heldout-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=None, help="projector steps (default: the experiment's)")
    ap.add_argument("--lr", type=float, default=None, help="projector lr (default: the experiment's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.experiment)
    steps = cfg.projector.steps if args.steps is None else args.steps
    lr = cfg.projector.lr if args.lr is None else args.lr
    top_k = cfg.projector.top_k
    start = time.perf_counter()
    print(
        f"experiment {Path(args.experiment).name}: projector steps={steps}, lr={lr:g}, top_k={top_k}, "
        f"weight_decay={cfg.projector.weight_decay:g}; {args.shots} shots, {args.heldout_size} held-out, "
        f"{args.candidates} draws/seed"
    )
    best_ho: dict[str, list[float]] = {v: [] for v in VARIANTS}
    best_fs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    top_ho: dict[str, list[float]] = {v: [] for v in VARIANTS}
    dense_ho: dict[str, list[float]] = {"before": [], "after": []}
    losses: list[tuple[float, float]] = []
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            pipe, space = seed_pipeline(cfg, seed, args.shots, args.heldout_size)
            model, fewshot, heldout = pipe.model, pipe.fewshot_batches, pipe.heldout_batches
            units = space.unit_names(pipe.num_layers)
            bank0 = pipe.bank(space, Path(tmp), 0, log=False)
            scorer0 = pipe.scorer(space, bank0, srm_config(cfg))
            candidates = draw(space, units, scorer0.weights, args.candidates, seed)
            scored = sorted(
                ((scorer0.score(p).objective, i, p) for i, p in enumerate(candidates)),
                key=lambda t: (-t[0], t[1]),
            )  # ties: first drawn
            top = [p for _, _, p in scored[:top_k]]
            best = top[0]
            mat0 = scorer0.materializer
            ho: dict[str, list[float]] = {"before": [accuracy(model, mat0, p, heldout) for p in top]}
            fs = {"before": accuracy(model, mat0, best, fewshot)}
            dense_ho["before"].append(accuracy(model, None, None, heldout))

            result = optimize_projector(
                model, fewshot, mat0, top, steps=steps, lr=lr, weight_decay=cfg.projector.weight_decay
            )
            losses.append((result.loss_before, result.loss_after))
            ho["same_weights"] = [accuracy(model, mat0, p, heldout) for p in top]
            fs["same_weights"] = accuracy(model, mat0, best, fewshot)
            dense_ho["after"].append(accuracy(model, None, None, heldout))

            bank1 = pipe.bank(
                space, Path(tmp), projector_version=1, log=False
            )  # calibrated with the new projector
            mat1 = Materializer(model, bank1)
            ho["repruned"] = [accuracy(model, mat1, p, heldout) for p in top]
            fs["repruned"] = accuracy(model, mat1, best, fewshot)
            for v in VARIANTS:
                best_ho[v].append(ho[v][0])
                best_fs[v].append(fs[v])
                top_ho[v].append(statistics.fmean(ho[v]))
            lines.append(
                f"{seed:<4} {len(candidates):>3}  {best.mean_sparsity(scorer0.weights):.4f} | "
                + " | ".join(f"{ho[v][0]:.4f} {fs[v]:.4f} {statistics.fmean(ho[v]):.4f}" for v in VARIANTS)
                + f" | {result.loss_before:.4f} -> {result.loss_after:.4f} | "
                f"{dense_ho['before'][-1]:.4f} -> {dense_ho['after'][-1]:.4f}"
            )
            print(
                f"seed {seed}: done ({result.seconds:.1f}s projector, {time.perf_counter() - start:.0f}s total)",
                flush=True,
            )

    print()
    print("per seed: best policy's held-out acc, few-shot acc, top-3 mean held-out acc, for each variant")
    print(
        "seed   n  spars  | before: ho     fs     top3   | same weights: ho fs top3 | re-pruned: ho fs top3 "
        "| projector few-shot loss | dense held-out"
    )
    for line in lines:
        print(line)
    print()
    for v in VARIANTS:
        print(
            f"{LABELS[v]:<46} best held-out {mean_std(best_ho[v])} | best few-shot {mean_std(best_fs[v])} | "
            f"top-{top_k} held-out {mean_std(top_ho[v])}"
        )
    for v in VARIANTS[1:]:
        d = [a - b for a, b in zip(best_ho[v], best_ho["before"], strict=True)]
        print(
            f"delta best held-out, {LABELS[v]} - before: {mean_std(d)} "
            f"(raised on {sum(x > 1e-9 for x in d)}/{len(d)} seeds, lowered on {sum(x < -1e-9 for x in d)})"
        )
    print(
        f"projector few-shot loss (mean over top-{top_k}): {mean_std([a for a, _ in losses])} -> "
        f"{mean_std([b for _, b in losses])}"
    )
    print(f"dense model held-out: {mean_std(dense_ho['before'])} -> {mean_std(dense_ho['after'])}")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
