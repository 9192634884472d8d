"""Open-ended and unlabelled tasks on the built-in tiny model: the few-shot batches the search scores (teacher
forced, no generation in a trial), the held-out figure per kind, the fidelity a kind allows, the projector
loss on answer tokens, and `efficientllava evaluate` with the data options."""

from __future__ import annotations

import re

import pytest
import torch
from vqa_sources import make_source

from efficientllava.cli import main
from efficientllava.config import ModelConfig, config_from_dict
from efficientllava.data import DataConfig
from efficientllava.errors import ConfigError
from efficientllava.heldout import heldout_lines
from efficientllava.pipeline import Pipeline, open_pipeline, reference_answer
from efficientllava.policy import PruningPolicy
from efficientllava.projector import optimize_projector, projector_state
from efficientllava.pruning.bank import build_bank
from efficientllava.pruning.materialize import Materializer
from efficientllava.pruning.units import unit_names
from efficientllava.scoring.fidelity import IGNORE
from efficientllava.scoring.srm import SRMConfig
from efficientllava.scoring.vqa_eval import score_answers
from efficientllava.space import Budget, SearchSpace

TINY = ModelConfig(spec="tiny", dtype="float32", device="cpu")
SHOTS, HELDOUT, BATCH = 8, 16, 8


@pytest.fixture(scope="module")
def open_pipe() -> Pipeline:
    """The tiny model on the open-ended synthetic task."""
    return open_pipeline(TINY, DataConfig(kind="open_ended", n_shots=SHOTS, heldout_size=HELDOUT), BATCH)


@pytest.fixture(scope="module")
def unlabelled_pipe() -> Pipeline:
    """The tiny model on the unlabelled synthetic task (images and questions only)."""
    return open_pipeline(TINY, DataConfig(kind="unlabelled", n_shots=SHOTS, heldout_size=HELDOUT), BATCH,
                         fidelity="kl", max_new_tokens=4)


def _targets(pipe: Pipeline, batches: list[dict[str, torch.Tensor]]) -> list[str]:
    """The teacher-forced answers of `batches`, decoded (EOS dropped)."""
    tok = pipe.loaded.processor.tokenizer
    out = []
    for b in batches:
        for row in b["answer_ids"].tolist():
            ids = [t for t in row if t not in (IGNORE, tok.eos_token_id)]
            out.append(tok.decode(ids, skip_special_tokens=True).strip())
    return out


def _space(pipe: Pipeline, level: float) -> SearchSpace:
    return SearchSpace(granularity="layer", levels=(0.0, level), budget=Budget(target=level, over_budget="reject"), method="magnitude",
                       pattern="unstructured", name="t")


def test_reference_answer_is_the_most_frequent_after_normalisation():
    assert reference_answer(["Red", "blue", "red.", "the red", "blue"]) == "Red"
    assert reference_answer(["cat"]) == "cat"
    assert reference_answer(["a", "b"]) == "a"  # ties: the first


def test_open_ended_fewshot_batches_teacher_force_the_reference(open_pipe):
    batches = open_pipe.fewshot_batches
    assert all("answer_ids" in b and "option_ids" not in b and "labelled" not in b for b in batches)
    words = [refs[0] for refs in open_pipe.task.fewshot["answers"]]
    assert _targets(open_pipe, batches) == words
    assert open_pipe.metric() == "exact_match" and open_pipe.tokens_per_sample() > 0


def test_open_ended_heldout_is_exact_match_of_greedy_answers(open_pipe):
    measured = open_pipe.measure("heldout")
    generated = open_pipe.generate("heldout").answers
    expected = score_answers(generated, open_pipe.task.heldout["answers"]).exact_match
    assert measured.metric == "exact_match" and measured.n == HELDOUT
    assert measured.value == expected and set(measured.figures) == {"exact_match"}
    assert measured.value >= 0.75  # the tiny model learnt the open-ended form: its dense answers are mostly right


def test_open_ended_scorer_records_every_signal(open_pipe, tmp_path):
    space = _space(open_pipe, 0.5)
    bank = build_bank(open_pipe.model, open_pipe.fewshot_batches, open_pipe.bank_spec(space), tmp_path / "bank")
    scorer = open_pipe.scorer(space, bank, SRMConfig(lam=0.0), fidelity="loglik")
    scorer.budget = None  # score the given policies as they are
    dense = scorer.score(PruningPolicy.uniform(unit_names(open_pipe.num_layers, "layer"), 0.0))
    pruned = scorer.score(PruningPolicy.uniform(unit_names(open_pipe.num_layers, "layer"), 0.5))
    assert dense.labelled and dense.kl == pytest.approx(0.0, abs=1e-6) and dense.objective == dense.loglik
    assert pruned.kl > dense.kl and pruned.loglik < dense.loglik <= 0.0


def test_unlabelled_fewshot_targets_are_the_dense_models_own_answers(unlabelled_pipe):
    batches = unlabelled_pipe.fewshot_batches
    assert all(not bool(b["labelled"]) and "answer_ids" in b for b in batches)
    assert not any(unlabelled_pipe.task.fewshot["answers"])
    assert _targets(unlabelled_pipe, batches) == list(unlabelled_pipe.dense_answers("fewshot"))
    assert unlabelled_pipe.metric() == "agreement"


def test_unlabelled_search_runs_on_kl_only(unlabelled_pipe, tmp_path):
    space = _space(unlabelled_pipe, 0.5)
    bank = build_bank(unlabelled_pipe.model, unlabelled_pipe.fewshot_batches, unlabelled_pipe.bank_spec(space),
                      tmp_path / "bank")
    for fidelity in ("accuracy", "loglik"):
        with pytest.raises(ConfigError, match=f"fidelity: {fidelity} needs answers.*use objective.fidelity: kl"):
            unlabelled_pipe.scorer(space, bank, SRMConfig(), fidelity=fidelity)
    scorer = unlabelled_pipe.scorer(space, bank, SRMConfig(lam=0.0), fidelity="kl")
    scorer.budget = None
    dense = scorer.score(PruningPolicy.uniform(unit_names(unlabelled_pipe.num_layers, "layer"), 0.0))
    # Teacher forced on its own greedy answers, the dense model agrees with itself on every token.
    assert not dense.labelled and dense.accuracy == 1.0 and dense.kl == pytest.approx(0.0, abs=1e-6)


def test_unlabelled_heldout_is_agreement_with_dense(unlabelled_pipe, tmp_path):
    dense = unlabelled_pipe.measure("heldout")
    assert dense.metric == "agreement" and dense.value == 1.0 and dense.n == HELDOUT
    space = _space(unlabelled_pipe, 0.5)
    bank = build_bank(unlabelled_pipe.model, unlabelled_pipe.fewshot_batches, unlabelled_pipe.bank_spec(space),
                      tmp_path / "bank")
    # A random-ish policy: prune the whole model hard; its answers must be compared with the dense ones.
    with Materializer(unlabelled_pipe.model, bank).applied(
            PruningPolicy.uniform(unit_names(unlabelled_pipe.num_layers, "layer"), 0.5)):
        pruned = unlabelled_pipe.measure("heldout")
        answers = unlabelled_pipe.generate("heldout").answers
    same = sum(a == d for a, d in zip(answers, unlabelled_pipe.dense_answers("heldout"), strict=True))
    assert pruned.value == same / HELDOUT


def test_unlabelled_fidelity_is_checked_before_the_model_loads(monkeypatch):
    import efficientllava.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ConfigError, match=r"objective.fidelity: accuracy needs answers, but the synthetic task is "
                                          r"unlabelled; use objective.fidelity: kl"):
        open_pipeline(TINY, DataConfig(kind="unlabelled", n_shots=4, heldout_size=4), fidelity="accuracy")
    with pytest.raises(ConfigError, match="data.kind is unlabelled; use objective.fidelity: kl"):
        config_from_dict({"name": "x", "space": "s.yaml", "data": {"kind": "unlabelled"},
                          "objective": {"fidelity": "loglik"}}, resolve_space=False)


def test_unlabelled_questions_with_options_use_the_dense_choice(tmp_path):
    source, _ = make_source(tmp_path, "parquet", "mc")
    pipe = open_pipeline(TINY, DataConfig(dataset="vqa", source=source, kind="unlabelled", n_shots=4,
                                          heldout_size=None), 4, fidelity="kl")
    assert pipe.task.has_options and pipe.task.kind == "unlabelled"
    for b in pipe.fewshot_batches + pipe.heldout_batches:
        assert "answers" not in b and not bool(b["labelled"]) and b["labels"].shape == b["answer_pos"].shape
    measured = pipe.measure("heldout")
    assert measured.metric == "agreement" and measured.value == 1.0 and measured.n == 8


def test_projector_trains_on_answer_tokens(open_pipe, tmp_path):
    space = _space(open_pipe, 0.5)
    bank = build_bank(open_pipe.model, open_pipe.fewshot_batches, open_pipe.bank_spec(space), tmp_path / "bank")
    before = {k: v.clone() for k, v in projector_state(open_pipe.model).items()}
    policy = PruningPolicy.uniform(unit_names(open_pipe.num_layers, "layer"), 0.5)
    try:
        result = optimize_projector(open_pipe.model, open_pipe.fewshot_batches, Materializer(open_pipe.model, bank),
                                    [policy], steps=3, lr=1e-3)
        assert result.loss_after < result.loss_before
    finally:  # the module's pipeline is shared: put the checkpoint's projector back
        with torch.no_grad():
            for key, tensor in projector_state(open_pipe.model).items():
                tensor.copy_(before[key])


def test_heldout_lines_name_the_figure():
    lines = heldout_lines({"dense": {"metric": "agreement", "agreement": 1.0, "mean_sparsity": 0.0},
                           "best": {"metric": "vqa_accuracy", "exact_match": 0.5, "vqa_accuracy": 0.6},
                           "uniform": {"accuracy": 0.9}})  # written before `metric` existed
    assert lines[0].startswith("held-out dense    agreement with dense 1") and "accuracy" not in lines[0]
    assert "VQA accuracy 0.6" in lines[1] and lines[2].endswith("accuracy 0.9")


@pytest.mark.parametrize(("kind", "figure"), [("open10", r"VQA accuracy (\d\.\d+) \[exact match \d\.\d+\]"),
                                               ("unlabelled", r"agreement with dense (1\.0000)")])
def test_evaluate_takes_the_data_options(capsys, tmp_path, monkeypatch, kind, figure):
    monkeypatch.setenv("EFFICIENTLLAVA_HOME", str(tmp_path / "home"))
    source, _ = make_source(tmp_path, "jsonl", kind)
    args = ["evaluate", "--data", "vqa", "--source", source, "--n-shots", "4", "--heldout-size", "6",
            "--batch-size", "4", "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "4",
            "--columns", "image=image", "question=question"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert re.search(figure + r" on vqa/heldout \((open-ended|unlabelled), n=6, greedy answers of at most 4 tokens\)",
                     out), out
    assert main([*args, "--uniform", "0.5", "--method", "magnitude", "--kind", "unlabelled"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"agreement with dense \d\.\d+ on vqa/heldout \(unlabelled, n=6.*mean sparsity 0\.500.*KL to dense",
                     out), out


def test_evaluate_bad_columns_is_one_line(capsys):
    assert main(["evaluate", "--data", "vqa", "--source", "x.jsonl", "--columns", "picture=img"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "--columns 'picture=img': expected FIELD=COLUMN" in err
