"""Does the search find better policies than known allocations at the same budget? (issue 8)

    python benchmarks/search_quality.py [--granularity sublayer] [--budgets 0.92,0.94] [--seeds 5]
                                        [--trials 48] [--methods all] [--markdown] [--quick]

For each few-shot draw (seed; 64 shots, 512 held-out samples of the synthetic task) and each
budget, every method picks ONE policy at the budget using few-shot signals only; the held-out set
is used only to report that policy's accuracy. Printed per budget: held-out accuracy mean +- sd
over draws, few-shot accuracy, mean sparsity, and the trial at which each method found the policy
it finally picked (mean over draws). Methods:

- uniform, OWL (lambda 0.08, M 5), error DP (OBC's least summed reconstruction error at the budget,
  `allocations.error_dp`): one policy each;
- best depth slope / best attention-MLP split: a sweep of slopes (splits) at the budget, the best
  on the default few-shot objective kept;
- searches with an equal trial budget (`--trials`, seed points included): random search;
  TPE on few-shot accuracy with repair (the previous default); TPE, GP (optuna's GPSampler) and
  the budget-preserving evolution on the new fidelity; evolution on each fidelity (accuracy,
  log-likelihood, KL); all but random and the previous default start from the seed points
  (`allocations.seed_policies`, error DP among them as in `efficientllava search`); the default
  sampler once more without the error-DP seed (what that seed adds);
- reference: the default search run 10x longer.

Then, on the default's own trials, the final pick re-made with other SRM weights lam (the SRM
re-measurement), and, on the pool of every policy any search scored for that draw, the pick made
by each fidelity signal alone (which signal selects the best held-out policy).

Searches run IN PROCESS: an Optuna study with the same scorer (`PolicyScorer`), budget projection
and samplers as `efficientllava search`, one trial at a time, no Ray (the machine has 2 shared
cores). What a Ray search adds is concurrency and fault tolerance, not different policies. The
benchmark searches one round: no projector optimisation or space evolution between rounds.
Scores are cached per policy (the same policy always scores the same), so shared seed points are
evaluated once; trial counts are per method all the same. A full run (sublayer, 2 budgets,
5 draws, 48 trials) takes about 30-40 minutes on 2 busy cores; `--quick` is a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import torch
from candidates import mean_std, seed_pipeline

from efficientllava.allocations import (
    attn_mlp_split,
    depth_slope,
    error_dp,
    owl,
    owl_outlier_ratios,
    room,
    seed_policies,
)
from efficientllava.config import load_config
from efficientllava.pipeline import Pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.problem import params_to_policy, srm_config
from efficientllava.pruning.reconstruction import reconstruction_errors
from efficientllava.pruning.units import prunable_units
from efficientllava.scoring.accuracy import evaluate_accuracy
from efficientllava.scoring.objective import PolicyScorer, TrialScore
from efficientllava.scoring.srm import SRMConfig
from efficientllava.search.api import ATTRIBUTION_ATTR, Param, Space, SpaceBudget
from efficientllava.search.samplers import make_sampler as registry_sampler
from efficientllava.search.samplers import uses_attribution
from efficientllava.space import SearchSpace, fit_to_budget, load_space, policy_indices

ROOT = Path(__file__).parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class Method:
    """One row of the table: how a policy is chosen."""

    name: str
    kind: str  # "fixed" | "sweep" | "search"
    sampler: str = ""  # search: random | tpe | gp | evolution
    fidelity: str = "kl"
    lam: float = 0.0
    over_budget: str = "project"
    seeded: bool = True  # search: start from all seed points (else: uniform only)
    error_seed: bool = True  # search: keep the error-DP policy among the seed points
    scale: int = 1  # trials = scale x --trials


@dataclass
class Outcome:
    """What one method picked on one draw at one budget."""

    heldout: float
    fewshot_accuracy: float
    mean_sparsity: float
    trials_to_best: int
    policy: PruningPolicy
    trials: list[tuple[PruningPolicy, TrialScore]] = field(default_factory=list)
    trial_s: float = math.nan  # mean seconds per scored trial (evaluation, plus the backward pass for guided)


def methods(fidelity: str, sampler: str, lam: float) -> list[Method]:
    """Every row, the default search (fidelity x sampler x lam) among them."""
    rows = [
        Method("uniform", "fixed"),
        Method("OWL", "fixed"),
        Method("error DP", "fixed"),
        Method("best depth slope", "sweep", fidelity=fidelity, lam=lam),
        Method("best attn/MLP split", "sweep", fidelity=fidelity, lam=lam),
        Method(f"random / {fidelity} / lam {lam:g}", "search", "random", fidelity, lam, seeded=False),
        Method("tpe / accuracy / lam 1, repair (previous default)", "search", "tpe", "accuracy", 1.0, "repair",
               seeded=False),
        Method(f"tpe / {fidelity} / lam {lam:g}", "search", "tpe", fidelity, lam),
        Method(f"gp / {fidelity} / lam {lam:g}", "search", "gp", fidelity, lam),
    ]
    for fid in ("accuracy", "loglik", "kl"):
        rows.append(Method(f"evolution / {fid} / lam {lam:g}", "search", "evolution", fid, lam))
    if sampler != "evolution":
        rows.append(Method(f"{sampler} / {fidelity} / lam {lam:g}", "search", sampler, fidelity, lam))
    rows.append(Method(f"{sampler} / {fidelity} / lam {lam:g}, no error-DP seed", "search", sampler, fidelity, lam,
                       error_seed=False))
    for other in (0.0, 1.0):
        if other != lam:
            rows.append(Method(f"{sampler} / {fidelity} / lam {other:g}", "search", sampler, fidelity, other))
    # The yardstick: the budget-preserving evolution (the default before guided) 10x longer; the same
    # reference whichever the default is, and one that costs no backward pass per trial.
    rows.append(Method(f"reference: evolution / {fidelity} / lam {lam:g}, 10x trials", "search", "evolution",
                       fidelity, lam, scale=10))
    return rows


def objective(score: TrialScore, fidelity: str, lam: float) -> float:
    """The search objective of a scored policy under (fidelity, lam)."""
    value = {"accuracy": score.accuracy, "loglik": score.loglik, "kl": -score.kl}[fidelity]
    return value - lam * score.gap


class Draw:
    """One few-shot draw: the model, its bank, and cached few-shot scores and held-out accuracies."""

    def __init__(self, pipe: Pipeline, space: SearchSpace, bank_dir: Path, srm: SRMConfig):
        self.pipe = pipe
        self.bank = pipe.bank(space, bank_dir, 0, log=False)
        self.bank.preload(pipe.loaded.device)
        self.units = prunable_units(pipe.model, space.granularity)
        self.names = [u.name for u in self.units]
        self.outliers = owl_outlier_ratios(pipe.model, pipe.fewshot_batches, self.units)
        self.errors = reconstruction_errors(pipe.model, pipe.fewshot_batches, self.bank, self.units)
        self.base_space = space
        self.srm = srm
        self.weights = pipe.cost_model(space.granularity).unit_param_counts()
        self._scorers: dict[float, PolicyScorer] = {}
        self._scores: dict[tuple[float, str], TrialScore] = {}
        self._heldout: dict[str, float] = {}
        self.scored_s = 0.0  # seconds spent scoring (cache misses only), and how many
        self.scored = 0

    def space(self, target: float, over_budget: str = "project") -> SearchSpace:
        """The space at budget `target` with `over_budget`."""
        return replace(self.base_space, budget=replace(self.base_space.budget, target=target, over_budget=over_budget))

    def scorer(self, target: float) -> PolicyScorer:
        """One scorer per budget (its own objective is not used: every term is recorded)."""
        if target not in self._scorers:
            self._scorers[target] = self.pipe.scorer(self.space(target), self.bank, self.srm)
        return self._scorers[target]

    def score(self, target: float, policy: PruningPolicy, attribution: bool = False) -> TrialScore:
        """Few-shot score of `policy` (cached; with its KL attribution when asked for)."""
        key = (target, policy.key)
        if key not in self._scores or (attribution and not self._scores[key].attribution):
            t0 = time.perf_counter()
            self._scores[key] = self.scorer(target).score(policy, attribution=attribution)
            self.scored_s += time.perf_counter() - t0
            self.scored += 1
        return self._scores[key]

    def heldout(self, target: float, policy: PruningPolicy) -> float:
        """Held-out accuracy of `policy` (cached)."""
        if policy.key not in self._heldout:
            with self.scorer(target).materializer.applied(policy):
                self._heldout[policy.key] = evaluate_accuracy(self.pipe.model, self.pipe.heldout_batches).accuracy
        return self._heldout[policy.key]


def make_sampler(name: str, seed: int, space: SearchSpace, units: list[str], weights: dict[str, int],
                 n_trials: int, errors: dict[str, dict[float, float]] | None = None) -> optuna.samplers.BaseSampler:
    """The sampler `name` exactly as `efficientllava search` configures it (the sampler registry)."""
    params = tuple(Param(u, 0, len(space.levels_for(u)) - 1, space.levels_for(u), float(weights[u]),
                         errors=tuple(errors[u][lv] for lv in space.levels_for(u)) if errors else None)
                   for u in units)
    search = SimpleNamespace(sampler=name, n_startup_trials=8)
    return registry_sampler(search, seed, Space(params, SpaceBudget(space.budget.target, space.budget.tolerance)))


def pick(trials: list[tuple[PruningPolicy, TrialScore]], fidelity: str, lam: float) -> int:
    """Index of the first trial with the highest objective (what a search reports as best)."""
    values = [objective(s, fidelity, lam) for _, s in trials]
    best = max(values)
    return values.index(best)


def run_search(draw: Draw, target: float, m: Method, n_trials: int, seed: int,
               seeds: list[tuple[str, PruningPolicy]]) -> list[tuple[PruningPolicy, TrialScore]]:
    """An in-process Optuna search: define-by-run level indices -> budget fit -> cached score."""
    space = draw.space(target, m.over_budget)
    weights = draw.weights
    study = optuna.create_study(direction="maximize",
                                sampler=make_sampler(m.sampler, seed, space, draw.names, weights, n_trials,
                                                     draw.errors))
    if not m.error_seed:
        seeds = [(name, p) for name, p in seeds if name != "error-dp"]
    guided = uses_attribution(m.sampler)
    for _, policy in (seeds if m.seeded else seeds[:1]):
        study.enqueue_trial(policy_indices(policy, space))
    trials: list[tuple[PruningPolicy, TrialScore]] = []

    def fn(trial: optuna.Trial) -> float:
        params = {u: trial.suggest_int(u, 0, len(space.levels_for(u)) - 1) for u in draw.names}
        policy = fit_to_budget(params_to_policy(params, space, draw.names), space, weights)
        score = draw.score(target, policy, attribution=guided)
        if guided:
            trial.set_user_attr(ATTRIBUTION_ATTR, dict(score.attribution))
        trials.append((policy, score))
        return objective(score, m.fidelity, m.lam)

    study.optimize(fn, n_trials=n_trials)
    return trials


def run_method(draw: Draw, target: float, m: Method, n_trials: int, seed: int,
               seeds: list[tuple[str, PruningPolicy]], sweep: int) -> Outcome:
    """The policy method `m` picks on this draw at this budget, with its held-out accuracy."""
    space = draw.space(target)
    weights = draw.weights
    if m.kind == "fixed":
        if m.name == "uniform":
            policy = seeds[0][1]
        elif m.name == "OWL":
            policy = owl(space, draw.units, weights, draw.outliers)
        else:
            policy = error_dp(space, draw.units, weights, draw.errors)
        trials = [(policy, draw.score(target, policy))]
    elif m.kind == "sweep":
        r = room(space, draw.units)
        make: Callable[[float], PruningPolicy]
        if "slope" in m.name:
            def make(x: float) -> PruningPolicy:
                return depth_slope(space, draw.units, weights, x)
        else:
            def make(x: float) -> PruningPolicy:
                return attn_mlp_split(space, draw.units, weights, x)
        grid = [2 * r * (i / sweep) for i in range(-sweep, sweep + 1)]  # spreads -2r..2r, 0 = uniform
        trials = [(p, draw.score(target, p)) for p in (make(x) for x in grid)]
    else:
        trials = run_search(draw, target, m, n_trials * m.scale, seed, seeds)
    i = pick(trials, m.fidelity, m.lam)
    policy, score = trials[i]
    return Outcome(draw.heldout(target, policy), score.accuracy, score.mean_sparsity, i + 1, policy, trials)


def timed_method(draw: Draw, target: float, m: Method, n_trials: int, seed: int,
                 seeds: list[tuple[str, PruningPolicy]], sweep: int) -> Outcome:
    """`run_method`, with the mean seconds of the trials it scored itself (cached seed points not counted)."""
    s0, n0 = draw.scored_s, draw.scored
    out = run_method(draw, target, m, n_trials, seed, seeds, sweep)
    n = draw.scored - n0
    out.trial_s = (draw.scored_s - s0) / n if n else math.nan
    return out


def main() -> None:
    """Run the benchmark and print its tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=str(ROOT / "experiments" / "tiny.yaml"))
    ap.add_argument("--granularity", default=None, help="layer | sublayer | matrix (default: the space's)")
    ap.add_argument("--budgets", default="0.92,0.94")
    ap.add_argument("--seeds", type=int, default=5, help="few-shot draws")
    ap.add_argument("--draws", help="comma list of the draws (seeds) to run, e.g. 3,4 (default: 0 .. seeds-1)")
    ap.add_argument("--save", help="append each draw's figures to this JSON-lines file (runs can be split over "
                                   "processes, then combined with --load)")
    ap.add_argument("--load", nargs="+", help="no search: make the tables from these --save files")
    ap.add_argument("--trials", type=int, default=48, help="trials per search method (the reference gets 10x)")
    ap.add_argument("--shots", type=int, default=64)
    ap.add_argument("--heldout-size", type=int, default=512)
    ap.add_argument("--fidelity", default="kl", help="the default search's fidelity (and the baselines')")
    ap.add_argument("--sampler", default="guided", help="the default search's sampler")
    ap.add_argument("--lam", type=float, default=None, help="the default search's SRM weight (default: the experiment's)")
    ap.add_argument("--lams", default="0,0.5,1,2", help="SRM weights of the re-selection sweep")
    ap.add_argument("--methods", default="all", help="comma list of row names to run (substring match), or all")
    ap.add_argument("--sweep", type=int, default=4, help="slopes/splits per side of uniform in the baseline sweeps")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as markdown (for the README)")
    ap.add_argument("--out", help="also write the tables as markdown to this file (benchmarks/readme.py puts it in "
                                  "the README)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 draw, 1 budget, 8 trials, 128 held-out")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.trials, args.heldout_size, args.budgets, args.sweep = 1, 8, 128, args.budgets.split(",")[0], 1
    torch.set_num_threads(args.threads)
    cfg = load_config(args.experiment)
    srm = srm_config(cfg)
    lam = srm.lam if args.lam is None else args.lam
    budgets = [float(b) for b in args.budgets.split(",")]
    lams = [float(x) for x in args.lams.split(",") if x.strip()]
    rows = methods(args.fidelity, args.sampler, lam)
    if args.methods != "all":
        wanted = [w.strip() for w in args.methods.split(",")]
        rows = [m for m in rows if any(w in m.name for w in wanted)]
    default = next((m for m in rows if m.kind == "search" and m.scale == 1 and m.error_seed and m.sampler == args.sampler
                    and m.fidelity == args.fidelity and m.lam == lam), None)
    space_path = Path(cfg.space)
    if args.granularity:
        named = ROOT / "search_spaces" / f"tiny-{args.granularity}.yaml"
        space_path = named if named.is_file() else space_path
    base = load_space(space_path)
    if args.granularity and base.granularity != args.granularity:
        base = replace(base, granularity=args.granularity)
    start = time.perf_counter()
    results: dict[tuple[float, str], list[Outcome]] = {}
    resel: dict[tuple[float, float], list[float]] = {}
    fidsel: dict[tuple[float, str], list[float]] = {}
    draws = [int(x) for x in args.draws.split(",")] if args.draws else list(range(args.seeds))
    if args.load:
        draws = load_saved(args.load, results, resel, fidsel, rows, budgets)
        args.seeds = len(draws)
        md = report(results, resel, fidsel, rows, budgets, lams, default, args)
        if args.out:
            write_markdown(args.out, md, sum_wall(args.load))
        return
    print(f"search quality: {base.name} ({base.granularity}), budgets {budgets}, {args.seeds} draws x "
          f"{args.shots} shots, {args.heldout_size} held-out, {args.trials} trials per search; default "
          f"{args.sampler} / {args.fidelity} / lam {lam:g}; in process (no Ray)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in draws:
            pipe, space = seed_pipeline(cfg, seed, args.shots, args.heldout_size)
            space = dataclasses.replace(base, unit_levels=()).with_unit_levels(
                {u: base.levels_for(u) for u in base.unit_names(pipe.num_layers)})
            draw = Draw(pipe, space, Path(tmp), srm)
            for target in budgets:
                seeds = seed_policies(draw.space(target), draw.units, draw.weights, draw.outliers, errors=draw.errors)
                for m in rows:
                    out = timed_method(draw, target, m, args.trials, seed, seeds, args.sweep)
                    results.setdefault((target, m.name), []).append(out)
                    if m is default:
                        for x in lams:
                            policy = out.trials[pick(out.trials, m.fidelity, x)][0]
                            resel.setdefault((target, x), []).append(draw.heldout(target, policy))
                pool = {p.key: (p, s) for m in rows if m.kind == "search"
                        for p, s in results[(target, m.name)][-1].trials}
                for fid in ("accuracy", "loglik", "kl"):
                    trials = list(pool.values())
                    fidsel.setdefault((target, fid), []).append(draw.heldout(target, trials[pick(trials, fid, 0.0)][0]))
                if args.save:
                    save_draw(args.save, seed, target, rows, results, resel, fidsel, lams,
                              time.perf_counter() - start, pooled=args.methods == "all")
                print(f"draw {seed} budget {target:g}: " + ", ".join(
                    f"{m.name.split(' (')[0]} {results[(target, m.name)][-1].heldout:.3f}" for m in rows)
                    + f" ({time.perf_counter() - start:.0f}s)", flush=True)
            del draw, pipe
    md = report(results, resel, fidsel, rows, budgets, lams, default, args)
    wall = time.perf_counter() - start
    print(f"total {wall:.0f}s wall, {time.process_time():.0f}s CPU")
    if args.out:
        write_markdown(args.out, md, wall)


FIGURES = ("heldout", "fewshot_accuracy", "mean_sparsity", "trials_to_best", "trial_s")


def save_draw(path: str, seed: int, target: float, rows: list[Method], results: dict[tuple[float, str], list[Outcome]],
              resel: dict[tuple[float, float], list[float]], fidsel: dict[tuple[float, str], list[float]],
              lams: list[float], wall: float, pooled: bool = True) -> None:
    """Append one (draw, budget)'s figures as a JSON line (what --load needs to make the tables).

    A run of some rows only (`--methods`) saves no fidelity-alone figures (`pooled` False): its pool
    would miss the other searches' policies, so --load keeps those of the full run."""
    line = {"seed": seed, "target": target, "wall_s": wall,
            "methods": {m.name: {k: getattr(results[(target, m.name)][-1], k) for k in FIGURES} for m in rows},
            "lams": {str(x): resel[(target, x)][-1] for x in lams if (target, x) in resel}}
    if pooled:
        line["fidelity"] = {f: fidsel[(target, f)][-1] for f in ("accuracy", "loglik", "kl")}
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def load_saved(paths: list[str], results: dict[tuple[float, str], list[Outcome]],
               resel: dict[tuple[float, float], list[float]], fidsel: dict[tuple[float, str], list[float]],
               rows: list[Method], budgets: list[float]) -> list[int]:
    """Fill the result maps from --save files; the draws found. Lines of one draw and budget are merged in
    order, a later line's rows (a rerun with --methods) replacing an earlier line's."""
    lines: dict[tuple[int, float], dict[str, Any]] = {}
    for path in paths:
        for text in Path(path).read_text().splitlines():
            if text.strip():
                d = json.loads(text)
                key = (int(d["seed"]), float(d["target"]))
                if key in lines:
                    old = lines[key]
                    d = {**old, **d, "methods": {**old["methods"], **d["methods"]},
                         "lams": d["lams"] or old["lams"], "fidelity": d.get("fidelity", old.get("fidelity"))}
                lines[key] = d
    draws = sorted({seed for seed, target in lines if target in budgets})
    for (_seed, target), d in sorted(lines.items()):
        if target not in budgets:
            continue
        for m in rows:
            f = d["methods"][m.name]
            results.setdefault((target, m.name), []).append(
                Outcome(f["heldout"], f["fewshot_accuracy"], f["mean_sparsity"], f["trials_to_best"],
                        PruningPolicy(()), trial_s=f.get("trial_s", math.nan)))
        for x, v in d["lams"].items():
            resel.setdefault((target, float(x)), []).append(v)
        for fid, v in d["fidelity"].items():
            fidsel.setdefault((target, fid), []).append(v)
    missing = [(seed, t) for seed in draws for t in budgets if (seed, t) not in lines]
    if missing:
        raise SystemExit(f"--load: no figures for draw/budget {missing}; run them with --draws and --save")
    return draws


def sum_wall(paths: list[str]) -> float:
    """Total wall seconds of the saved runs (each file's last line: its run's elapsed time)."""
    total = 0.0
    for path in paths:
        last = [t for t in Path(path).read_text().splitlines() if t.strip()][-1]
        total += float(json.loads(last)["wall_s"])
    return total


def _ms(outs: list[Outcome]) -> str:
    """Mean milliseconds per scored trial over draws ('-' where a method scored nothing new)."""
    values = [o.trial_s for o in outs if math.isfinite(o.trial_s)]
    return f"{1000 * statistics.fmean(values):.0f}" if values else "-"


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def report(results: dict[tuple[float, str], list[Outcome]], resel: dict[tuple[float, float], list[float]],
           fidsel: dict[tuple[float, str], list[float]], rows: list[Method], budgets: list[float],
           lams: list[float], default: Method | None, args: argparse.Namespace) -> list[str]:
    """Print the tables (plain, and markdown with --markdown); the markdown lines."""
    md: list[str] = []
    for target in budgets:
        table = [("method", "trials", "held-out (mean +- sd)", "few-shot acc", "sparsity", "trials to best",
                  "ms / trial")]
        for m in rows:
            outs = results[(target, m.name)]
            n = {"fixed": "1", "sweep": str(2 * args.sweep + 1)}.get(m.kind, str(args.trials * m.scale))
            name = m.name + (" [default]" if m is default else "")
            table.append((name, n, mean_std([o.heldout for o in outs]),
                          f"{statistics.fmean(o.fewshot_accuracy for o in outs):.4f}",
                          f"{statistics.fmean(o.mean_sparsity for o in outs):.4f}",
                          f"{statistics.fmean(o.trials_to_best for o in outs):.1f}", _ms(outs)))
        title = f"budget {target:g} mean sparsity, {args.seeds} few-shot draws, held-out n={args.heldout_size}:"
        print(f"\n{title}")
        md += [f"**{title}**", ""]
        _print(table, args.markdown, md)
        if default is not None and lams:
            lam_rows = [("SRM lam (re-pick on the default's trials)", "held-out (mean +- sd)")]
            lam_rows += [(f"{x:g}", mean_std(resel[(target, x)])) for x in lams]
            _print(lam_rows, args.markdown, md)
        fid_rows = [("fidelity alone (pick among every searched policy)", "held-out (mean +- sd)")]
        fid_rows += [(fid, mean_std(fidsel[(target, fid)])) for fid in ("accuracy", "loglik", "kl")]
        _print(fid_rows, args.markdown, md)
        if default is not None:
            d = [o.heldout for o in results[(target, default.name)]]
            better = [m.name for m in rows if m is not default and
                      statistics.fmean(o.heldout for o in results[(target, m.name)]) > statistics.fmean(d) + _sd(d)]
            line = (f"default {statistics.fmean(d):.4f} +- {_sd(d):.4f}; rows above it by more than one sd: "
                    f"{', '.join(better) or 'none'}")
            print(line)
            md += [line, ""]
    return md


def _print(table: list[tuple[str, ...]], markdown: bool, md: list[str]) -> None:
    """Print `table` aligned (and as markdown when asked); append its markdown to `md`."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "|".join("---" for _ in table[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table[1:]] + [""]
    md += lines
    if markdown:
        print()
        print("\n".join(lines))


def write_markdown(path: str, md: list[str], wall: float) -> None:
    """The tables as a markdown file, headed by the command that made them (for benchmarks/readme.py)."""
    command = "python benchmarks/search_quality.py " + " ".join(sys.argv[1:])
    head = f"Generated by `{command.replace(' --out ' + path, '')}` on {time.strftime('%Y-%m-%d')} ({wall / 60:.0f} min)."
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join([head, "", *md]).rstrip() + "\n")


if __name__ == "__main__":
    main()
