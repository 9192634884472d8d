"""A worker's session across rounds: the KL reference is the dense checkpoint in every round."""

from __future__ import annotations

import torch
import yaml

from efficientllava.config import config_from_dict
from efficientllava.problem.session import CHECKPOINT_PROJECTOR, RoundInputs, WorkerSession, resolved_space
from efficientllava.projector import projector_state
from efficientllava.space import load_space

SPACE = {"name": "session", "granularity": "layer", "levels": [0.0, 0.5],
         "budget": {"target": 0.25, "tolerance": 0.2, "over_budget": "project"}, "method": "magnitude"}


def _inputs(space: dict, r: int, projector: dict | None, version: int) -> RoundInputs:
    return RoundInputs(round=r, space=space, bank_space=space, projector=projector, projector_version=version,
                       bank_tag=CHECKPOINT_PROJECTOR, projector_hash=None if projector is None else f"v{version}")


def test_kl_reference_is_the_checkpoint_model_in_every_round(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTLLAVA_HOME", str(tmp_path / "home"))  # the bank cache
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    cfg = config_from_dict({"name": "session", "model": {"spec": "tiny"}, "space": str(tmp_path / "space.yaml"), "data": {"n_shots": 8, "heldout_size": 8},
                            "eval": {"batch_size": 8}, "objective": {"fidelity": "kl"}})
    session = WorkerSession(cfg)
    space = resolved_space(load_space(tmp_path / "space.yaml"), session.pipeline.num_layers).to_dict()
    session.enter(_inputs(space, 0, None, 0))
    first = [b.logprobs.clone() for b in session.scorer.reference.batches]
    trained = {k: v + 0.5 for k, v in projector_state(session.model).items()}  # a "trained" projector
    session.enter(_inputs(space, 1, trained, 1))
    assert all(torch.equal(a, b.logprobs) for a, b in zip(first, session.scorer.reference.batches, strict=True))
    live = projector_state(session.model)
    assert all(torch.equal(live[k], trained[k]) for k in trained)  # trials run with the round's projector
    # A worker that starts at round 1 (a resume) computes the same reference, from the checkpoint's projector.
    fresh = WorkerSession(cfg)
    fresh.enter(_inputs(space, 1, trained, 1))
    assert all(torch.allclose(a, b.logprobs) for a, b in zip(first, fresh.scorer.reference.batches, strict=True))
    score = fresh.scorer.score(fresh.policy({u: 0 for u in fresh.units})[1])
    assert score.kl > 0  # the dense model under another projector is not the reference
