"""Entry points of a search: start Ray, create or open the experiment, hand it to the driver actor.

`python -m efficientllava.search.runner CONFIG.yaml [--dir DIR]` runs a search and
`python -m efficientllava.search.runner --resume DIR` continues one (the CLI wraps the same functions).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from efficientllava.config import ExperimentConfig, check_resources, load_config
from efficientllava.errors import EfficientLLaVAError
from efficientllava.experiment import create_experiment, open_experiment
from efficientllava.search.driver import NAMESPACE, driver_actor
from efficientllava.search.trainable import load_problem_class


def init_ray() -> None:
    """Connect to Ray: the cluster at RAY_ADDRESS (as under `ray job submit`) or a new local one on all CPUs."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, namespace=NAMESPACE, ignore_reinit_error=True)
    else:  # a local cluster on every CPU of this machine; no dashboard (it costs seconds and memory)
        ray.init(namespace=NAMESPACE, ignore_reinit_error=True, include_dashboard=False)


def run_search(cfg: ExperimentConfig, experiment_dir: str | Path | None = None) -> Path:
    """Run a new search for `cfg`; returns its experiment directory (`<storage>/<name>-<stamp>` by default)."""
    load_problem_class(cfg.problem)  # fail before anything is created
    init_ray()
    check_resources(cfg)
    exp = create_experiment(cfg, experiment_dir)
    print(f"[efficientllava] experiment directory: {exp.root}", flush=True)
    return _drive(exp.root)


def resume_search(experiment_dir: str | Path) -> Path:
    """Continue a killed, crashed or finished search from its directory; returns the directory."""
    exp = open_experiment(experiment_dir)
    cfg = exp.load_config()
    load_problem_class(cfg.problem)
    init_ray()
    check_resources(cfg)
    print(f"[efficientllava] resuming {exp.root}", flush=True)
    return _drive(exp.root)


def _drive(root: Path) -> Path:
    """Run the experiment's driver actor to completion; user errors come back unwrapped."""
    import ray

    actor = driver_actor(open_experiment(root))
    try:
        return Path(ray.get(actor.run.remote()))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, EfficientLLaVAError):
            raise cause from None
        raise


def main(argv: list[str] | None = None) -> int:
    """`python -m efficientllava.search.runner`: run or resume a search."""
    parser = argparse.ArgumentParser(prog="python -m efficientllava.search.runner", description=main.__doc__)
    parser.add_argument("config", nargs="?", help="experiment YAML to search")
    parser.add_argument("--dir", help="experiment directory to create (default <storage>/<name>-<stamp>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the search in this experiment directory")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.resume):
        parser.error("give either CONFIG or --resume DIR")
    try:
        if args.resume:
            path = resume_search(args.resume)
        else:
            path = run_search(load_config(args.config), args.dir)
    except EfficientLLaVAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
