"""How much of a Ray Tune search's wall time is not spent evaluating policies?

    python benchmarks/ray_overhead.py [--trials 24] [--concurrent 2] [--toy-sleep 0.5] [--skip-toy]

Runs two real one-round searches through the CLI (`efficientllava search CONFIG --dir DIR --no-heldout`,
Ray started by the search itself): the tiny default (experiments/tiny.yaml with rounds 1) and the toy
problem `efficientllava.search.toy:QuadraticProblem` whose evaluate sleeps --toy-sleep seconds. For each it
prints `efficientllava.trials.overhead_summary` and a verdict against the 25% target: steady-state overhead
(1 - eval/cycle, cycle = time between consecutive trial ends on one reused actor) and whole-round overhead
(1 - eval/slot, slot = round wall time x concurrency / trials; it includes actor start-up and setup).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from efficientllava.trials import overhead_summary

ROOT = Path(__file__).parents[1]
TARGET = 0.25  # overhead the search machinery may add to the evaluations


def tiny_config(experiment: Path, trials: int, concurrent: int, storage: Path) -> dict[str, Any]:
    """The experiment YAML with one round of `trials` trials; relative paths made absolute."""
    cfg = yaml.safe_load(experiment.read_text())
    cfg["space"] = str((experiment.parent / cfg["space"]).resolve())
    cfg["search"] = {
        **cfg.get("search", {}),
        "rounds": 1,
        "trials_per_round": trials,
        "max_concurrent": concurrent,
    }
    cfg["storage"] = str(storage)
    return cfg


def toy_config(tmp: Path, trials: int, concurrent: int, sleep_s: float) -> dict[str, Any]:
    """A one-round toy search whose evaluate sleeps `sleep_s` seconds."""
    space = tmp / "toy-space.yaml"
    space.write_text(yaml.safe_dump({"params": {f"x_{i}": [0, 9] for i in range(4)}, "sleep_s": sleep_s}))
    return {
        "name": "toy-bench",
        "problem": "efficientllava.search.toy:QuadraticProblem",
        "space": str(space),
        "search": {"rounds": 1, "trials_per_round": trials, "max_concurrent": concurrent},
        "storage": str(tmp / "runs"),
    }


def run_search(name: str, cfg: dict[str, Any], tmp: Path, log: Path) -> tuple[Path, float]:
    """Write `cfg`, run `efficientllava search` on it; returns (experiment dir, wall seconds)."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    exp = tmp / f"{name}-exp"
    cmd = [sys.executable, "-m", "efficientllava.cli", "search", str(path), "--dir", str(exp), "--no-heldout"]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp, env=os.environ.copy(), check=False
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        sys.exit(f"{name} search failed (rc {proc.returncode}); last lines of {log}:\n{tail}")
    return exp, wall


def report(name: str, exp: Path, wall: float, concurrent: int) -> None:
    """Print the overhead table of one search and its verdict line."""
    df = overhead_summary(exp)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(df.round(3).to_string(index=False))
    row = df.iloc[0]
    steady, whole = float(row["steady_overhead"]), float(row["round_overhead"])
    per_trial = float(row["cycle_s"]) * steady  # cycle minus the evaluations inside it
    print(
        f"verdict {name}: steady-state overhead {steady:.1%} ({'meets' if steady <= TARGET else 'misses'} "
        f"{TARGET:.0%}), whole-round overhead {whole:.1%} ({'meets' if whole <= TARGET else 'misses'} {TARGET:.0%}); "
        f"eval {row['mean_eval_s'] * 1e3:.0f} ms/trial, ~{per_trial * 1e3:.0f} ms/trial of Tune between evaluations "
        f"on an actor, start-up {row['startup_s']:.1f}s; round {row['seconds']:.1f}s, whole command {wall:.1f}s"
    )
    if int(row["actors"]) < concurrent:
        print(
            f"note {name}: only {int(row['actors'])} of max_concurrent={concurrent} trial actors finished a trial"
        )


def main() -> None:
    """Run both searches and print their figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=str(ROOT / "experiments" / "tiny.yaml"))
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--concurrent", type=int, default=2, help="search.max_concurrent")
    ap.add_argument("--toy-sleep", type=float, default=0.5, help="seconds each toy evaluation sleeps")
    ap.add_argument("--skip-toy", action="store_true")
    ap.add_argument("--keep", help="keep the experiment directories and logs under this folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep).resolve() if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        runs = [
            ("tiny", tiny_config(Path(args.experiment).resolve(), args.trials, args.concurrent, tmp / "runs"))
        ]
        if not args.skip_toy:
            runs.append(
                (
                    f"toy-sleep-{args.toy_sleep:g}s",
                    toy_config(tmp, args.trials, args.concurrent, args.toy_sleep),
                )
            )
        print(f"{args.trials} trials, max_concurrent {args.concurrent}, 1 round, {os.cpu_count()} CPUs")
        for name, cfg in runs:
            exp, wall = run_search(name, cfg, tmp, tmp / f"{name}.log")
            print(f"\n== {name} ({exp.name})")
            report(name, exp, wall, args.concurrent)


if __name__ == "__main__":
    main()
