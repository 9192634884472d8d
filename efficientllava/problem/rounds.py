"""Between and after rounds, on a worker that already holds the model: projector training, held-out check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from efficientllava.pipeline import Pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.problem.session import RoundInputs, WorkerSession
from efficientllava.projector import optimize_projector
from efficientllava.space import SearchSpace, uniform_level


def train_projector(session: WorkerSession, policies: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Optimise the projector under `policies` (the round's top-k); returns its weights and losses.

    The worker's model goes back to the round's projector afterwards: the new weights reach the
    workers as the next round's inputs, through the driver (which also stores them).
    """
    cfg = session.cfg.projector
    assert session.scorer is not None and session.inputs is not None
    result = optimize_projector(session.model, session.projector_batches(), session.scorer.materializer,
                                [PruningPolicy.from_mapping(p) for p in policies], steps=cfg.steps, lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
    session.set_projector(session.inputs.projector)
    return {"state_dict": result.state_dict, "loss_before": result.loss_before, "loss_after": result.loss_after,
            "steps": result.steps, "seconds": result.seconds}


def _entry(pipeline: Pipeline, policy: PruningPolicy | None, space: SearchSpace, **extra: Any) -> dict[str, Any]:
    """The task's held-out figure (`metric`: accuracy, exact_match, vqa_accuracy or agreement with the dense
    model, see Pipeline.measure), sparsity, kept fraction and FLOPs speed-up of the model as it is now."""
    cost = pipeline.cost_model(space.granularity)
    units = space.unit_names(pipeline.num_layers)
    policy = policy or PruningPolicy.uniform(units, 0.0)
    measured = pipeline.measure("heldout")
    c = cost.cost(policy)
    return {"metric": measured.metric, **measured.figures, "n": measured.n,
            "mean_sparsity": policy.mean_sparsity(cost.unit_param_counts()),
            "kept_fraction": c.kept_fraction, "flops_speedup": c.flops_speedup, **extra}


def heldout_entries(session: WorkerSession, first: RoundInputs, best_inputs: RoundInputs,
                    best: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The held-out figure of dense, uniform-at-budget (round 0's space and bank) and the best trial's policy
    (with its round's projector and bank). Dense comes first, on the checkpoint's projector: for unlabelled
    data its answers are what the others' agreement is measured against."""
    session.enter(first)
    assert session.space is not None and session.scorer is not None
    pipeline, space0 = session.pipeline, session.space
    out = {"dense": _entry(pipeline, None, space0, projector_version=first.projector_version)}
    uniform = PruningPolicy(tuple((u, uniform_level(space0, u)) for u in session.units))
    with session.scorer.materializer.applied(uniform):
        out["uniform"] = _entry(pipeline, uniform, space0, projector_version=first.projector_version,
                                method=space0.method)
    session.enter(best_inputs)
    assert session.space is not None and session.scorer is not None
    policy = PruningPolicy.from_mapping(best["policy"])
    with session.scorer.materializer.applied(policy):
        out["best"] = _entry(pipeline, policy, session.space, projector_version=best_inputs.projector_version,
                             round=best["round"], number=best["number"], fewshot_accuracy=best.get("accuracy"),
                             objective=best.get("objective"))
    metric = out["best"]["metric"]
    # The few-shot accuracy is the same figure as the held-out one except for VQA accuracy (several answers).
    if isinstance(out["best"]["fewshot_accuracy"], float) and metric != "vqa_accuracy":
        out["best"]["fewshot_minus_heldout"] = out["best"]["fewshot_accuracy"] - out["best"][metric]
    return out
