"""Fidelity signals: accuracy, soft accuracy, log-likelihood and KL to the dense model, one forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from efficientllava.config import config_from_dict
from efficientllava.data.synthetic import generate, make_synthetic
from efficientllava.errors import ConfigError
from efficientllava.models.loading import load_model
from efficientllava.models.tiny import open_batches
from efficientllava.policy import PruningPolicy
from efficientllava.prompting import COMPACT, encode_batches, model_inputs
from efficientllava.pruning.bank import BankSpec, build_bank
from efficientllava.pruning.materialize import Materializer
from efficientllava.scoring.accuracy import evaluate_accuracy
from efficientllava.scoring.cost import CostModel
from efficientllava.scoring.fidelity import (
    FIDELITIES,
    answer_token_logits,
    check_fidelity,
    dense_reference,
    evaluate_fidelity,
)
from efficientllava.scoring.objective import PolicyScorer
from efficientllava.scoring.srm import SRMConfig
from efficientllava.space import Budget

LEVELS = (0.0, 0.3, 0.6, 0.9)
UNITS = [f"layer.{i}" for i in range(6)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The trained tiny model, 24 multiple-choice and 24 open-ended samples, and a magnitude bank."""
    loaded = load_model("tiny", device="cpu")
    model, processor = loaded.model, loaded.processor
    choice = encode_batches(processor, make_synthetic(24, 3, "train"), 12, COMPACT)
    rows = generate(24, 4, "train")
    opened = open_batches(rows, processor, 12)
    spec = BankSpec("layer", tuple((u, LEVELS) for u in UNITS), "magnitude", "unstructured")
    bank = build_bank(model, choice, spec, tmp_path_factory.mktemp("bank") / "bank")
    return model, choice, opened, Materializer(model, bank), bank


@pytest.mark.parametrize("kind", ["choice", "open"])
def test_kl_of_dense_to_itself_is_zero_and_grows_with_pruning(tiny, kind: str) -> None:
    model, choice, opened, materializer, _ = tiny
    batches = choice if kind == "choice" else opened
    reference = dense_reference(model, batches)
    dense = evaluate_fidelity(model, batches, reference)
    assert dense.kl == 0.0
    kls = []
    for level in LEVELS[1:]:
        with materializer.applied(PruningPolicy.uniform(UNITS, level)):
            kls.append(evaluate_fidelity(model, batches, reference).kl)
    assert 0.0 < kls[0] < kls[1] < kls[2]
    assert evaluate_fidelity(model, batches, reference).kl == 0.0  # restored: the reference is unchanged


def test_choice_signals_match_accuracy_and_each_other(tiny) -> None:
    model, choice, _, materializer, _ = tiny
    reference = dense_reference(model, choice)
    with materializer.applied(PruningPolicy.uniform(UNITS, 0.6)):
        result = evaluate_fidelity(model, choice, reference)
        plain = evaluate_accuracy(model, choice)
    assert result.accuracy == plain.accuracy and result.correct == plain.correct
    assert result.soft_accuracy == pytest.approx(plain.soft_accuracy)
    assert result.loglik < 0 and result.labelled and result.n == 24
    assert result.value("accuracy") == result.accuracy
    assert result.value("loglik") == result.loglik
    assert result.value("kl") == -result.kl


def test_unlabelled_choice_batches_score_agreement_with_dense(tiny) -> None:
    model, choice, _, materializer, _ = tiny
    unlabelled = [{k: v for k, v in b.items() if k not in ("answers", "labels")} for b in choice]
    reference = dense_reference(model, unlabelled)
    assert not reference.labelled
    dense = evaluate_fidelity(model, unlabelled, reference)
    assert dense.accuracy == 1.0 and dense.kl == 0.0 and not dense.labelled
    with materializer.applied(PruningPolicy.uniform(UNITS, 0.9)):
        pruned = evaluate_fidelity(model, unlabelled, reference)
    assert pruned.accuracy < 1.0 and pruned.kl > 0
    _, _, opened, _, _ = tiny
    marked = [{**b, "labelled": torch.tensor(False)} for b in opened]
    assert not dense_reference(model, marked).labelled and dense_reference(model, opened).labelled


def test_open_ended_logits_are_the_teacher_forced_ones(tiny) -> None:
    model, _, opened, _, _ = tiny
    batch = opened[0]
    with torch.no_grad():
        logits, sample = answer_token_logits(model, batch)
        full = model(**model_inputs(batch)).logits
    targets = batch["answer_ids"]
    rows = [(i, int(batch["answer_pos"][i]) + j) for i in range(targets.shape[0]) for j in range(targets.shape[1])
            if targets[i, j] != -100]
    expected = torch.stack([full[i, p] for i, p in rows]).float()
    assert torch.allclose(logits, expected, atol=1e-4)
    assert sample.tolist() == [i for i, _ in rows]


def test_open_ended_signals(tiny) -> None:
    model, _, opened, _, _ = tiny
    reference = dense_reference(model, opened)
    result = evaluate_fidelity(model, opened, reference)
    # Exact match under teacher forcing: every answer token (and EOS) is the arg-max.
    with torch.no_grad():
        matches = []
        for batch in opened:
            logits, sample = answer_token_logits(model, batch)
            ok = logits.argmax(1) == batch["answer_ids"][batch["answer_ids"] != -100]
            matches += [bool(ok[sample == i].all()) for i in range(batch["answer_ids"].shape[0])]
    assert result.correct == tuple(matches)
    assert result.accuracy > 0.5  # the tiny model is trained on the open-ended form too
    assert result.loglik < 0
    # soft accuracy is the mean answer probability, at least exp(mean log-likelihood) (Jensen)
    assert math.exp(result.loglik) <= result.soft_accuracy <= 1


def test_scorer_records_every_term_and_uses_the_chosen_fidelity(tiny) -> None:
    model, choice, _, _, bank = tiny
    cost = CostModel.from_model(model, "layer", 20)
    policy = PruningPolicy.uniform(UNITS, 0.6)
    scores = {}
    for fidelity in FIDELITIES:
        scorer = PolicyScorer(model, choice, bank, Budget(0.6, 0.01), SRMConfig(lam=0.5), cost, fidelity)
        scores[fidelity] = scorer.score(policy)
    a = scores["accuracy"]
    assert scores["kl"].kl == a.kl > 0 and scores["loglik"].loglik == a.loglik
    assert a.objective == pytest.approx(a.accuracy - 0.5 * a.gap)
    assert scores["loglik"].objective == pytest.approx(a.loglik - 0.5 * a.gap)
    assert scores["kl"].objective == pytest.approx(-a.kl - 0.5 * a.gap)
    assert {s.fidelity for s in scores.values()} == set(FIDELITIES)
    assert all(s.within_budget for s in scores.values())


def test_bad_fidelity_is_one_line_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="objective.fidelity='f1'") as err:
        check_fidelity("f1")
    assert "\n" not in str(err.value)
    space = tmp_path / "s.yaml"
    space.write_text("granularity: layer\nlevels: [0.0, 0.5]\nbudget: {target: 0.5}\n")
    with pytest.raises(ConfigError, match="objective.fidelity='f1' is not allowed") as err:
        config_from_dict({"name": "x", "space": str(space), "objective": {"fidelity": "f1"}})
    assert "\n" not in str(err.value)
    assert config_from_dict({"name": "x", "space": str(space)}).objective.fidelity in FIDELITIES
