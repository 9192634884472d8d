"""Projector optimisation on a random tiny LLaVA: lowers the few-shot loss, touches only the projector."""

from __future__ import annotations

import pytest
import torch
from helpers import MAGNITUDE_SPEC, SMALL
from safetensors.torch import save_file

from efficientllava.data.synthetic import make_synthetic
from efficientllava.errors import ConfigError
from efficientllava.models.tiny import build_tiny
from efficientllava.policy import PruningPolicy
from efficientllava.projector import (
    ProjectorResult,
    load_projector,
    optimize_projector,
    projector_state,
    save_projector,
)
from efficientllava.prompting import encode_batches
from efficientllava.pruning.bank import build_bank
from efficientllava.pruning.materialize import Materializer
from efficientllava.scoring.accuracy import answer_logits

POLICIES = [
    PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.0}),
    PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.5}),
]


@pytest.fixture
def setup(small_setup):
    return small_setup


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def few_shot_loss(model, batches) -> float:
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(answer_logits(model, b), b["labels"], reduction="sum")
            for b in batches
        ]
    return float(sum(losses)) / sum(len(b["labels"]) for b in batches)


def test_optimisation_lowers_loss_and_changes_only_the_projector(setup) -> None:
    model, _, batches, mat = setup
    model.model.vision_tower.train()  # an odd mode mix must come back as it was
    model.model.language_model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    before = snapshot(model)
    with mat.applied(POLICIES[1]):
        pruned_before = few_shot_loss(model, batches)

    result = optimize_projector(model, batches, mat, POLICIES, steps=15, lr=1e-2)

    assert isinstance(result, ProjectorResult) and result.steps == 15 and result.seconds > 0
    assert result.loss_after < result.loss_before - 0.05
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)
    assert {f"model.multi_modal_projector.{k}" for k in result.state_dict} == {
        k for k in before if k.startswith("model.multi_modal_projector.")
    }
    for k, v in result.state_dict.items():
        assert torch.equal(v, after[f"model.multi_modal_projector.{k}"])
    assert mat.current == {"layer.0": 0.0, "layer.1": 0.0}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    # The loss measured independently under one of the policies went down too.
    model.eval()
    with mat.applied(POLICIES[1]):
        assert few_shot_loss(model, batches) < pruned_before


def test_loss_is_the_mean_over_policies(setup) -> None:
    model, _, batches, mat = setup
    per_policy = []
    for policy in POLICIES:
        with mat.applied(policy):
            per_policy.append(few_shot_loss(model, batches))
    result = optimize_projector(model, batches, mat, POLICIES, steps=0, lr=1e-2)
    assert result.loss_before == result.loss_after == pytest.approx(sum(per_policy) / 2, rel=1e-5)


def test_failure_rolls_back_everything(setup) -> None:
    model, _, batches, mat = setup
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    bad = [POLICIES[0], PruningPolicy.from_mapping({"layer.0": 0.25, "layer.1": 0.0})]  # 0.25 is not banked
    with pytest.raises(ConfigError, match="0.25"):
        optimize_projector(model, batches, mat, bad, steps=3, lr=1e-2)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": -1, "lr": 1e-3}, "steps"),
        ({"steps": 1, "lr": 0.0}, "lr"),
        ({"steps": 1, "lr": 1e-3, "weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_bad_arguments(setup, kwargs, match) -> None:
    model, _, batches, mat = setup
    with pytest.raises(ConfigError, match=match):
        optimize_projector(model, batches, mat, POLICIES, **kwargs)
    with pytest.raises(ConfigError, match="at least one policy"):
        optimize_projector(model, batches, mat, [], steps=1, lr=1e-3)


def test_save_load_round_trip(setup, tmp_path) -> None:
    model, _, batches, mat = setup
    optimize_projector(model, batches, mat, POLICIES[:1], steps=2, lr=1e-2)
    trained = projector_state(model)
    path = save_projector(model, tmp_path / "proj" / "v1.safetensors")
    assert path.is_file() and not path.with_name(path.name + ".partial").exists()

    fresh, _ = build_tiny(SMALL)
    assert not all(torch.equal(v, projector_state(fresh)[k]) for k, v in trained.items())
    load_projector(fresh, path)
    assert all(torch.equal(v, projector_state(fresh)[k]) for k, v in trained.items())


def test_load_rejects_mismatched_files(setup, tmp_path) -> None:
    model, *_ = setup
    state = projector_state(model)
    wrong_shape = {**state, "linear_2.weight": torch.zeros(3, 3)}
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ConfigError, match=r"shape\.safetensors.*linear_2\.weight"):
        load_projector(model, tmp_path / "shape.safetensors")
    save_file({k: v for k, v in state.items() if k != "linear_1.bias"}, str(tmp_path / "keys.safetensors"))
    with pytest.raises(ConfigError, match=r"keys\.safetensors.*missing linear_1\.bias"):
        load_projector(model, tmp_path / "keys.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="junk.safetensors"):
        load_projector(model, tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="absent.safetensors"):
        load_projector(model, tmp_path / "absent.safetensors")
    assert all(torch.equal(v, projector_state(model)[k]) for k, v in state.items())


def test_low_precision_model_trains_through_fp32_masters(tmp_path) -> None:
    model, processor = build_tiny(SMALL)
    model.to(torch.bfloat16).eval()
    batches = encode_batches(processor, make_synthetic(16, 0, "train"), 8, "compact", dtype=torch.bfloat16)
    mat = Materializer(model, build_bank(model, batches, MAGNITUDE_SPEC, tmp_path / "bank"))
    before = snapshot(model)
    result = optimize_projector(model, batches, mat, POLICIES, steps=5, lr=1e-2)
    assert result.loss_after < result.loss_before
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)
    assert all(v.dtype == torch.bfloat16 for v in after.values() if v.is_floating_point())
