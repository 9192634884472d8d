"""Held-out check of a finished search: the best policy vs. dense and uniform pruning at the budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from efficientllava.config import ExperimentConfig
from efficientllava.errors import ConfigError
from efficientllava.experiment import open_experiment, write_json_atomic
from efficientllava.pipeline import Pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.problem import open_round
from efficientllava.pruning.materialize import Materializer
from efficientllava.scoring.accuracy import evaluate_accuracy
from efficientllava.space import SearchSpace, uniform_level

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
    pipeline, space0, bank0 = open_round(cfg, root, None, 0, str(Path(root) / "spaces" / "round-0.yaml"))
    units = space0.unit_names(pipeline.num_layers)
    out = {"dense": _entry(pipeline, None, space0, projector_version=0)}
    uniform = PruningPolicy(tuple((u, uniform_level(space0, u)) for u in units))
    with Materializer(pipeline.model, bank0).applied(uniform):
        out["uniform"] = _entry(pipeline, uniform, space0, projector_version=0, method=space0.method)
    del pipeline, bank0  # one model in memory at a time (a 7B model is 14 GB)
    version = int(best.get("projector_version") or 0)
    pipeline, space_b, bank = open_round(cfg, root, best.get("projector_path"), version, best["space_path"])
    policy = PruningPolicy.from_mapping(best["policy"])
    with Materializer(pipeline.model, bank).applied(policy):
        out["best"] = _entry(pipeline, policy, space_b, projector_version=version, round=best["round"],
                             fewshot_accuracy=best.get("accuracy"), objective=best.get("objective"))
    out["best"]["fewshot_minus_heldout"] = out["best"]["fewshot_accuracy"] - out["best"]["accuracy"]
    write_json_atomic(Path(root) / HELDOUT_FILE, out)
    return out
