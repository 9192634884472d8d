"""Does the SRM term pick policies that generalise better than the few-shot fidelity alone?

    python benchmarks/srm_selection.py [--seeds 5] [--candidates 150] [--lam 1.0] [--fidelity kl] [--diagnostic 16]

For each seed of the few-shot draw (64 shots, 1024 held-out samples of the synthetic task), K random
level choices per unit are fitted onto the tiny space's budget as trials are (projected into the
band by default), de-duplicated and scored on the few-shot set. Selection A takes the policies with
the highest few-shot fidelity value (lam = 0; `--fidelity`, default the experiment's), selection B
the argmax of fidelity - lam * gap (the search's objective). With accuracy, many policies tie at the
top (64 samples: steps of 1/64), so each selection's figures are the EXPECTED values over its
tied set (a uniformly random tie-break), with every tied policy evaluated on the held-out set.
Prints per seed and mean +- std over seeds: held-out accuracy, few-shot accuracy, few-shot minus
held-out gap and mean sparsity of A and B, B's win/tie/loss count against A, a lam sweep, and a
diagnostic: on a random sample of the candidates, how well the SRM gap tracks the measured gap.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from candidates import draw, mean_std, seed_pipeline

from efficientllava.config import load_config
from efficientllava.pipeline import Pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.problem import srm_config
from efficientllava.pruning.materialize import Materializer
from efficientllava.scoring.accuracy import evaluate_accuracy
from efficientllava.scoring.objective import TrialScore

ROOT = Path(__file__).parents[1]
_TIE = 1e-12  # objectives closer than this are a tie


@dataclass(frozen=True)
class Pick:
    """Expected figures of one selection rule on one seed (means over its tied policies)."""

    heldout: float
    fewshot: float
    sparsity: float
    ties: int

    @property
    def gap(self) -> float:
        """Few-shot minus held-out accuracy."""
        return self.fewshot - self.heldout


class Heldout:
    """Held-out accuracy of policies, each evaluated once."""

    def __init__(self, pipe: Pipeline, materializer: Materializer):
        self.pipe = pipe
        self.materializer = materializer
        self.cache: dict[str, float] = {}

    def __call__(self, policy: PruningPolicy) -> float:
        """Held-out accuracy of `policy` (materialised from the bank, then restored)."""
        if policy.key not in self.cache:
            with self.materializer.applied(policy):
                self.cache[policy.key] = evaluate_accuracy(
                    self.pipe.model, self.pipe.heldout_batches
                ).accuracy
        return self.cache[policy.key]


def fidelity_value(score: TrialScore, fidelity: str) -> float:
    """The few-shot signal `fidelity` names, higher is better."""
    return {"accuracy": score.accuracy, "loglik": score.loglik, "kl": -score.kl}[fidelity]


def select(policies: list[PruningPolicy], scores: list[TrialScore], lam: float, heldout: Heldout,
           fidelity: str = "accuracy") -> Pick:
    """The policies maximising fidelity - lam * gap, and their expected figures."""
    values = [fidelity_value(s, fidelity) - lam * s.gap for s in scores]
    best = max(values)
    tied = [i for i, v in enumerate(values) if v >= best - _TIE]
    return Pick(
        heldout=statistics.fmean(heldout(policies[i]) for i in tied),
        fewshot=statistics.fmean(scores[i].accuracy for i in tied),
        sparsity=statistics.fmean(scores[i].mean_sparsity for i in tied),
        ties=len(tied),
    )


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                out[order[t]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return math.nan
    return statistics.correlation(rx, ry)


def main() -> None:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=str(ROOT / "experiments" / "tiny.yaml"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=150, help="random draws per seed (before dedupe)")
    ap.add_argument("--shots", type=int, default=64)
    ap.add_argument("--heldout-size", type=int, default=1024)
    ap.add_argument(
        "--lam", type=float, default=None, help="SRM weight of selection B (default: the experiment's)"
    )
    ap.add_argument("--sweep", default="0,0.5,1,2", help="lam values of the sweep line ('' to skip)")
    ap.add_argument(
        "--diagnostic", type=int, default=16, help="random candidates per seed evaluated on held-out"
    )
    ap.add_argument("--fidelity", default=None, help="accuracy | loglik | kl (default: the experiment's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.experiment)
    srm = srm_config(cfg)
    lam = srm.lam if args.lam is None else args.lam
    fidelity = args.fidelity or cfg.objective.fidelity
    sweep = [float(x) for x in args.sweep.split(",") if x.strip()]
    start = time.perf_counter()
    rows: list[tuple[int, int, Pick, Pick]] = []
    swept: dict[float, list[Pick]] = {x: [] for x in sweep}
    diag_gap: list[float] = []  # Spearman(SRM gap, measured gap) per seed
    diag_acc: list[float] = []  # Spearman(objective, held-out accuracy) per seed
    diag_fs: list[float] = []  # Spearman(few-shot accuracy, held-out accuracy) per seed
    caps: list[float] = []
    gaps: list[float] = []
    cap_vs_sparsity: list[float] = []  # Spearman(capacity, mean sparsity) per seed
    level_ratio: dict[float, list[float]] = {}  # level -> log(||W*M|| / ||W||) of every linear, every seed
    print(
        f"experiment {Path(args.experiment).name}: fidelity {fidelity}, srm lam={lam:g} (B), delta={srm.delta:g}, scale={srm.scale:g}, "
        f"aggregate={srm.aggregate}; {args.shots} shots, {args.heldout_size} held-out, "
        f"{args.candidates} draws/seed"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            pipe, space = seed_pipeline(cfg, seed, args.shots, args.heldout_size)
            bank = pipe.bank(space, Path(tmp), 0, log=False)
            bank.preload(pipe.loaded.device)
            scorer = pipe.scorer(space, bank, srm)
            policies = draw(space, space.unit_names(pipe.num_layers), scorer.weights, args.candidates, seed)
            scores = [scorer.score(p) for p in policies]
            caps.extend(s.capacity for s in scores)
            gaps.extend(s.gap for s in scores)
            cap_vs_sparsity.append(spearman([s.capacity for s in scores], [s.mean_sparsity for s in scores]))
            for (name, level), norm in bank.pruned_norms.items():
                level_ratio.setdefault(round(level, 6), []).append(math.log(norm / bank.dense_norms[name]))
            heldout = Heldout(pipe, scorer.materializer)
            a = select(policies, scores, 0.0, heldout, fidelity)
            b = select(policies, scores, lam, heldout, fidelity)
            rows.append((seed, len(policies), a, b))
            for x in sweep:
                swept[x].append(select(policies, scores, x, heldout, fidelity))
            if args.diagnostic:
                idx = random.Random(1000 + seed).sample(
                    range(len(policies)), min(args.diagnostic, len(policies))
                )
                ho = [heldout(policies[i]) for i in idx]
                diag_gap.append(
                    spearman(
                        [scores[i].gap for i in idx],
                        [scores[i].accuracy - h for i, h in zip(idx, ho, strict=True)],
                    )
                )
                diag_acc.append(spearman([fidelity_value(scores[i], fidelity) - lam * scores[i].gap for i in idx], ho))
                diag_fs.append(spearman([fidelity_value(scores[i], fidelity) for i in idx], ho))
            print(
                f"seed {seed}: {len(policies)} distinct policies, {len(heldout.cache)} evaluated on held-out "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )

    print()
    print(
        f"per seed (expected over tied policies)       | A: few-shot {fidelity} alone | B: {fidelity} - lam*gap"
    )
    print("seed  n   | heldout fewshot  gap    spars  ties | heldout fewshot  gap    spars  ties | B vs A")
    wins = ties = losses = 0
    for seed, n, a, b in rows:
        d = b.heldout - a.heldout
        verdict = "tie" if abs(d) < 1e-9 else ("win" if d > 0 else "loss")
        wins, ties, losses = (
            wins + (verdict == "win"),
            ties + (verdict == "tie"),
            losses + (verdict == "loss"),
        )
        print(
            f"{seed:<4}  {n:<3} | {a.heldout:.4f}  {a.fewshot:.4f}  {a.gap:+.4f} {a.sparsity:.4f} {a.ties:>4} | "
            f"{b.heldout:.4f}  {b.fewshot:.4f}  {b.gap:+.4f} {b.sparsity:.4f} {b.ties:>4} | "
            f"{verdict} ({d:+.4f})"
        )
    print()
    for name, picks in (("A (lam=0)", [r[2] for r in rows]), (f"B (lam={lam:g})", [r[3] for r in rows])):
        print(
            f"{name:<12} held-out {mean_std([p.heldout for p in picks])} | few-shot "
            f"{mean_std([p.fewshot for p in picks])} | gap {mean_std([p.gap for p in picks])} | "
            f"sparsity {mean_std([p.sparsity for p in picks])} | ties/seed {statistics.fmean(p.ties for p in picks):.1f}"
        )
    diffs = [r[3].heldout - r[2].heldout for r in rows]
    gdiff = [r[3].gap - r[2].gap for r in rows]
    print(
        f"B - A: held-out {mean_std(diffs)}, gap {mean_std(gdiff)}; B vs A on held-out: "
        f"{wins} win / {ties} tie / {losses} loss over {len(rows)} seeds; "
        f"smaller gap on {sum(g < -1e-9 for g in gdiff)}/{len(rows)} seeds"
    )
    if sweep:
        print(
            "lam sweep (mean over seeds): "
            + "; ".join(
                f"lam={x:g}: held-out {statistics.fmean(p.heldout for p in ps):.4f}, "
                f"gap {statistics.fmean(p.gap for p in ps):+.4f}, sparsity {statistics.fmean(p.sparsity for p in ps):.4f}"
                for x, ps in swept.items()
            )
        )
    print(
        f"SRM capacity rho over all candidates: min {min(caps):.3f}, median {statistics.median(caps):.3f}, "
        f"max {max(caps):.3f} (rho > 1: pruned norms above dense); SRM gap {min(gaps):.3f}..{max(gaps):.3f}; "
        f"Spearman(rho, mean sparsity) {statistics.fmean(cap_vs_sparsity):+.3f}"
    )
    print(
        "bank norm ratio ||W*M||/||W|| per level (geometric mean over linears and seeds): "
        + ", ".join(f"{lv:g}: {math.exp(statistics.fmean(v)):.2f}" for lv, v in sorted(level_ratio.items()))
    )
    if diag_gap:

        def fmt(v: list[float]) -> str:
            ok = [x for x in v if not math.isnan(x)]
            return f"{statistics.fmean(ok):+.3f} ({len(ok)} seeds)" if ok else "n/a"

        print(
            f"diagnostic on {args.diagnostic} random candidates/seed, Spearman mean over seeds: "
            f"SRM gap vs measured gap {fmt(diag_gap)}; objective vs held-out {fmt(diag_acc)}; "
            f"few-shot {fidelity} vs held-out {fmt(diag_fs)}"
        )
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
