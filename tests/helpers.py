"""Helpers shared by tests (imported as `helpers`; conftest.py holds only fixtures): small random LLaVA
models and the magnitude bank spec the fixtures use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from optuna.trial import TrialState
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from efficientllava.experiment import open_experiment
from efficientllava.models.tiny import TinyConfig
from efficientllava.pruning.bank import BankSpec
from efficientllava.search.study import open_study

# One intra-op thread: tiny matmuls on a busy 2-core machine are far slower with two (spin-waits).
torch.set_num_threads(1)

SMALL = TinyConfig(text_layers=2, text_hidden=64, text_intermediate=128, vision_layers=1)
MAGNITUDE_SPEC = BankSpec(
    "layer", (("layer.0", (0.0, 0.5)), ("layer.1", (0.0, 0.5))), "magnitude", "unstructured"
)


def random_llava() -> LlavaForConditionalGeneration:
    """A random 2-layer LLaVA (16 px images, 4 image tokens of id 3) built from config, in eval mode."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=3, vision_feature_select_strategy="default"
    )
    return LlavaForConditionalGeneration(config).eval()


def records(exp_root: Path) -> dict[str, dict]:
    """Every trial record of an experiment by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted((exp_root / "trials").glob("*.json"))}


def unfinished_trials(root: Path, before: dict[str, bytes]) -> dict[int, dict[str, Any]]:
    """After a kill mid round 0: the numbers (and params) of round 0's trials that were in flight."""
    exp = open_experiment(root)
    assert json.loads(exp.state_path.read_text())["status"] == "running"
    study0 = [t for t in open_study(exp, 0).get_trials() if "number" in t.user_attrs]
    running = [t.user_attrs["number"] for t in study0 if t.state == TrialState.RUNNING]
    assert running, "some trials should have been in flight at the kill"
    unfinished = {n for n in running if f"0-{n}.json" not in before}
    return {t.user_attrs["number"]: t.params for t in study0 if t.user_attrs["number"] in unfinished}


def check_resumed(root: Path, before: dict[str, bytes], unfinished: dict[int, dict[str, Any]], rounds: int,
                  trials: int) -> None:
    """A search killed mid round 0 and resumed lost and repeated nothing (the toy never errors here)."""
    exp = open_experiment(root)
    # 1. Every trial record written before the kill is still there, byte for byte.
    for name, data in before.items():
        assert (root / "trials" / name).read_bytes() == data, name
    recs = records(root)
    # 2. Each round has exactly `trials` finished trials, and nothing was evaluated twice: the only
    #    repeated params are re-enqueued trials that had not finished.
    for r in range(rounds):
        done = [rec for rec in recs.values() if rec["round"] == r]
        assert len(done) == trials and all(rec["status"] == "COMPLETE" for rec in done)
        keys = [tuple(sorted(rec["params"].items())) for rec in done]
        assert len(set(keys)) == len(keys), f"round {r}: some params were evaluated twice"
    retries = {rec["retry_of"]: rec for rec in recs.values() if rec["retry_of"] is not None}
    assert set(retries) <= set(unfinished), "only interrupted trials are re-run"
    for number, rec in retries.items():
        # The retry replays every param of the interrupted trial (all sampled at ask time).
        assert rec["round"] == 0 and unfinished[number].items() <= rec["params"].items()
        assert unfinished[number], "an interrupted trial with no recorded params is not a retry"
    # 3. The study kept its pre-kill history, and agrees with the records.
    trials0 = {t.user_attrs["number"]: t for t in open_study(exp, 0).get_trials() if "number" in t.user_attrs}
    for name in before:
        rec = recs[name]
        t = trials0[rec["number"]]
        assert t.state == TrialState.COMPLETE and t.value == rec["objective"] and t.params == rec["params"]
    assert not [t for t in trials0.values() if t.state == TrialState.RUNNING]
    for n in unfinished:
        assert trials0[n].state == TrialState.FAIL
    # 4. The search finished: every round, the table and the best policy.
    state = json.loads(exp.state_path.read_text())
    assert state["status"] == "done" and state["round"] == rounds - 1
    best = json.loads(exp.best_policy_path.read_text())
    assert best["objective"] == max(rec["objective"] for rec in recs.values())
    assert exp.trials_parquet.is_file()
