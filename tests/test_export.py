"""Export of a policy as an HF checkpoint: reloads with plain from_pretrained, same sparsity and accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.export import export_policy, measured_sparsity, saved_sparsity
from efficientllava.models.loading import load_model
from efficientllava.policy import PruningPolicy
from efficientllava.scoring.accuracy import evaluate_accuracy, option_logits

POLICY = PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.0})
SOURCE_META = {"prompt_format": "compact", "key": "abc"}


@pytest.fixture
def setup(small_setup):
    return small_setup


def test_export_reloads_with_plain_from_pretrained(setup, tmp_path) -> None:
    model, processor, batches, mat = setup
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with mat.applied(POLICY):
        expected_acc = evaluate_accuracy(model, batches)
        with torch.no_grad():
            expected_logits = [option_logits(model, b) for b in batches]

    out = export_policy(
        model,
        processor,
        mat,
        POLICY,
        tmp_path / "pruned",
        source_meta=SOURCE_META,
        extra_meta={"objective": 0.5, "round": 2},
    )

    assert out == (tmp_path / "pruned").resolve() and not (tmp_path / "pruned.partial").exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())  # dense weights back
    assert mat.current == {"layer.0": 0.0, "layer.1": 0.0}

    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    sparsity = measured_sparsity(reloaded, mat.bank.unit_linears)
    assert sparsity["layer.0"] == pytest.approx(0.5, abs=1e-3)
    assert sparsity["layer.1"] == 0.0
    got = evaluate_accuracy(reloaded, batches)
    assert got.correct == expected_acc.correct and got.accuracy == expected_acc.accuracy
    with torch.no_grad():
        for batch, want in zip(batches, expected_logits, strict=True):
            torch.testing.assert_close(option_logits(reloaded, batch), want)

    assert PruningPolicy.load(out / "policy.json") == POLICY
    assert json.loads((out / "efficientllava.json").read_text()) == SOURCE_META
    record = json.loads((out / "export.json").read_text())
    assert record["policy_key"] == POLICY.key and record["extra"] == {"objective": 0.5, "round": 2}
    assert record["units"]["layer.0"] == {"policy": 0.5, "measured": pytest.approx(sparsity["layer.0"])}
    assert record["units"]["layer.1"] == {"policy": 0.0, "measured": 0.0}
    assert record["mean_sparsity"] == pytest.approx(0.25, abs=1e-3)  # two equal-sized layers
    assert record["bank"]["method"] == "magnitude"
    # The project's own loader takes the export as a local checkpoint, prompt format included.
    loaded = load_model(str(out), device="cpu")
    assert loaded.prompt_format == "compact"
    assert saved_sparsity(out, mat.bank.unit_linears)[0] == pytest.approx(sparsity)


def test_export_without_source_meta_and_replacing_an_export(setup, tmp_path) -> None:
    model, processor, _, mat = setup
    out = tmp_path / "pruned"
    export_policy(model, processor, mat, POLICY, out, source_meta={"prompt_format": "compact"})
    other = PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.5})
    export_policy(model, processor, mat, other, out)
    assert PruningPolicy.load(out / "policy.json") == other
    assert not (out / "efficientllava.json").exists()
    assert json.loads((out / "export.json").read_text())["mean_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_export_refuses_foreign_directory_and_bad_policy(setup, tmp_path) -> None:
    model, processor, _, mat = setup
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier export"):
        export_policy(model, processor, mat, POLICY, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PolicyError, match="0.3"):
        export_policy(model, processor, mat, PruningPolicy.from_mapping({"layer.0": 0.3}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())
    with pytest.raises(ConfigError, match="JSON"):
        export_policy(model, processor, mat, POLICY, tmp_path / "x", extra_meta={"obj": object()})
