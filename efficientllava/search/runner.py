"""Entry points of a search: connect to Ray, create or open the experiment, run its driver here."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from efficientllava.config import ExperimentConfig, check_resources
from efficientllava.experiment import create_experiment, open_experiment
from efficientllava.log import current_level, get_logger
from efficientllava.search.api import load_problem_class
from efficientllava.search.driver import SearchDriver
from efficientllava.search.workers import NAMESPACE

log = get_logger(__name__)


def init_ray() -> None:
    """Connect to Ray: the cluster at RAY_ADDRESS (as under `ray job submit`) or a new local one on all CPUs."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    verbose = current_level() <= logging.DEBUG
    # Ray's own INFO lines (dashboard URLs, "Started a local Ray instance") and its copy of every actor's
    # stdout/stderr, `(EvalWorker pid=...)`-prefixed, only with --verbose: otherwise the workers' log
    # records reach this console through the driver (`Workers.relay_logs`), as plain lines.
    level = logging.INFO if verbose else logging.WARNING
    if address:
        ray.init(address=address, namespace=NAMESPACE, ignore_reinit_error=True, log_to_driver=verbose,
                 logging_level=level)
        log.info(f"joined the Ray cluster at {ray.get_runtime_context().gcs_address}")
    else:  # a local cluster on every CPU of this machine; no dashboard (it costs seconds and memory)
        ray.init(namespace=NAMESPACE, ignore_reinit_error=True, log_to_driver=verbose, logging_level=level,
                 include_dashboard=False)
        log.debug(f"started a local Ray instance at {ray.get_runtime_context().gcs_address}")


def check_before_start(cfg: ExperimentConfig) -> None:
    """Everything checkable without Ray or a model: the problem class, and its `check_config(cfg)` when it has one
    (the pruning problem checks the space, the model spec and the data source there)."""
    cls = load_problem_class(cfg.problem)
    check = getattr(cls, "check_config", None)
    if callable(check):
        check(cfg)


def run_search(cfg: ExperimentConfig, experiment_dir: str | Path | None = None, *, heldout: bool = True) -> Path:
    """Run a new search for `cfg`; returns its experiment directory (`<storage>/<name>-<stamp>` by default).

    The config is checked before Ray starts, and the cluster's resources before the directory is created,
    so a search that cannot run leaves no directory behind; the new directory's driver lock is held to the end.
    """
    check_before_start(cfg)
    init_ray()
    check_resources(cfg)
    exp = create_experiment(cfg, experiment_dir)
    log.info(f"experiment directory: {exp.root}")
    with exp.driver_lock("efficientllava search"):
        return SearchDriver(exp.root).run(heldout=heldout, locked=True)


def resume_search(experiment_dir: str | Path, *, heldout: bool = True, locked: bool = False) -> Path:
    """Continue a killed, crashed or finished search from its directory; returns the directory.

    A second driver of the same directory fails here at once, before Ray starts (`locked`: the
    caller holds the directory's driver lock already).
    """
    exp = open_experiment(experiment_dir)
    exp.check_format()
    cfg = exp.load_config()
    load_problem_class(cfg.problem)
    with contextlib.nullcontext() if locked else exp.driver_lock("efficientllava resume"):
        driver = SearchDriver(exp.root)
        driver.prepare()  # records first: journal and state.json rebuilt from them if damaged, before Ray
        log.info(f"resuming {exp.root}")
        init_ray()
        check_resources(cfg)
        return driver.run(heldout=heldout, locked=True)


def heldout_check(experiment_dir: str | Path) -> Path:
    """Recompute the held-out comparison of a search (its workers load the model); returns the directory."""
    exp = open_experiment(experiment_dir)
    exp.check_format()
    cfg = exp.load_config()
    with exp.driver_lock("efficientllava report --heldout"):
        init_ray()
        check_resources(cfg)
        return SearchDriver(exp.root).heldout(locked=True)
