"""Held-out check of a finished search: the best policy vs. dense and uniform pruning at the budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from efficientllava.config import ExperimentConfig
from efficientllava.errors import ConfigError
from efficientllava.experiment import open_experiment, write_json_atomic
from efficientllava.pipeline import Pipeline, open_pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.projector import load_projector
from efficientllava.pruning.materialize import Materializer
from efficientllava.scoring.accuracy import evaluate_accuracy
from efficientllava.space import SearchSpace, load_space, uniform_level

HELDOUT_FILE = "heldout.json"


def _entry(pipeline: Pipeline, policy: PruningPolicy | None, space: SearchSpace, **extra: Any) -> dict[str, Any]:
    cost = pipeline.cost_model(space.granularity)
    units = space.unit_names(pipeline.num_layers)
    policy = policy or PruningPolicy.uniform(units, 0.0)
    result = evaluate_accuracy(pipeline.model, pipeline.heldout_batches)
    c = cost.cost(policy)
    return {"accuracy": result.accuracy, "n": result.n, "mean_sparsity": policy.mean_sparsity(cost.unit_param_counts()),
            "kept_fraction": c.kept_fraction, "flops_speedup": c.flops_speedup, **extra}


def heldout_comparison(cfg: ExperimentConfig, root: str) -> dict[str, dict[str, Any]]:
    """Held-out accuracy of dense, uniform-at-budget and the best found policy; written to heldout.json."""
    exp = open_experiment(root)
    if not exp.best_policy_path.is_file():
        raise ConfigError(f"{root}: no best_policy.json yet (no finished trial); run or resume the search first")
    best = json.loads(exp.best_policy_path.read_text())
    pipeline = open_pipeline(cfg.model, cfg.data, cfg.eval.batch_size)
    banks = Path(root) / "banks"
    space0 = load_space(Path(root) / "spaces" / "round-0.yaml")
    units = space0.unit_names(pipeline.num_layers)
    out = {"dense": _entry(pipeline, None, space0, projector_version=0)}
    uniform = PruningPolicy(tuple((u, uniform_level(space0, u)) for u in units))
    with Materializer(pipeline.model, pipeline.bank(space0, banks, 0, log=False)).applied(uniform):
        out["uniform"] = _entry(pipeline, uniform, space0, projector_version=0, method=space0.method)
    version = int(best.get("projector_version") or 0)
    if best.get("projector_path"):
        load_projector(pipeline.model, best["projector_path"])
    space_b = load_space(best["space_path"])
    policy = PruningPolicy.from_mapping(best["policy"])
    with Materializer(pipeline.model, pipeline.bank(space_b, banks, version, log=False)).applied(policy):
        out["best"] = _entry(pipeline, policy, space_b, projector_version=version, round=best["round"],
                             fewshot_accuracy=best.get("accuracy"), objective=best.get("objective"))
    out["best"]["fewshot_minus_heldout"] = out["best"]["fewshot_accuracy"] - out["best"]["accuracy"]
    write_json_atomic(Path(root) / HELDOUT_FILE, out)
    return out
