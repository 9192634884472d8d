"""Every model family end to end, by path: a small random checkpoint of its transformers class is saved in HF
layout, then `efficientllava evaluate` (dense and under a uniform matrix-granularity policy), a 2-round x
4-trial search with a projector round, and `export`, reloaded with the family's own `from_pretrained` class.

All families share the session's Ray cluster (conftest.py). The checkpoints have random
weights, so accuracies are chance level: what is checked is that every step runs and that the numbers it
writes agree with each other and with the weights on disk.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from efficientllava.cli import main
from efficientllava.config import load_config
from efficientllava.export import export_experiment, measured_sparsity, saved_sparsity
from efficientllava.families import family_for, family_names
from efficientllava.projector import projector_state
from efficientllava.pruning.units import prunable_units, unit_names
from efficientllava.search.runner import run_search
from efficientllava.testing.tiny_families import save_tiny_family
from efficientllava.trials import load_trials

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ROUNDS, TRIALS, LAYERS = 2, 4, 2
EVAL = ["--data", "synthetic", "--n-shots", "8", "--heldout-size", "16", "--batch-size", "8", "--device", "cpu",
        "--dtype", "float32"]
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """Every family's search runs on the session's Ray cluster."""
    yield
    print("\nper-family end-to-end seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in TIMINGS.items()))


def write_config(tmp_path: Path, checkpoint: Path) -> Path:
    """experiments/tiny.yaml on `checkpoint`: 2 rounds x 4 trials at matrix granularity, 2 projector steps, 1 worker."""
    cfg = yaml.safe_load((REPO / "experiments" / "tiny.yaml").read_text())
    space = {"name": "family-e2e", "granularity": "matrix", "levels": [0.0, 0.25, 0.5, 0.75],
             "budget": {"target": 0.5, "tolerance": 0.05}, "method": "sparsegpt"}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    cfg.update(name="family-e2e", model={"spec": str(checkpoint), "dtype": "float32", "device": "cpu"},
               space=str(tmp_path / "space.yaml"), storage=str(tmp_path / "runs"), eval={"batch_size": 8})
    cfg["data"].update(n_shots=8, heldout_size=16)
    # One worker: the family's path through a worker (load, bank, trials, projector round, held-out check) is
    # what is tested here; several workers sharing trials are tested on the tiny model (test_e2e.py), and a
    # second worker would only add a model load per family.
    cfg["search"].update(rounds=ROUNDS, trials_per_round=TRIALS, max_concurrent=1, n_startup_trials=2)
    cfg["projector"].update(steps=2, top_k=2)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(capsys, args: list[str]) -> str:
    """`efficientllava ARGS` in this process; its output (the command must succeed)."""
    rc = main(args)
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    return out.out


@pytest.mark.parametrize("model_type", family_names())
def test_family_end_to_end(model_type, tmp_path, capsys, monkeypatch, ray_cluster):
    start = time.perf_counter()
    monkeypatch.setenv("EFFICIENTLLAVA_HOME", str(tmp_path / "home"))  # evaluate caches its bank there
    family = family_for(model_type)
    checkpoint = save_tiny_family(model_type, tmp_path / "checkpoint")

    # 1. evaluate, dense: multiple-choice accuracy on 16 held-out samples
    out = run_cli(capsys, ["evaluate", "--model", str(checkpoint), *EVAL])
    match = re.search(r"accuracy (\d\.\d+) \((\d+)/16\) on synthetic/heldout", out)
    assert match, out
    assert float(match.group(1)) == int(match.group(2)) / 16

    # 2. evaluate under a uniform policy, one ratio per weight matrix
    out = run_cli(capsys, ["evaluate", "--model", str(checkpoint), *EVAL, "--uniform", "0.5",
                           "--granularity", "matrix"])
    assert "mean sparsity 0.500" in out and "layer.1.down=0.5" in out and "(sparsegpt, unstructured)" in out, out

    # 3. search: 2 rounds x 4 trials, the projector optimised between them
    exp_dir = tmp_path / f"exp-{model_type}"  # the driver actor is named after it: one name per family
    root = run_search(load_config(write_config(tmp_path, checkpoint)), exp_dir)
    state = json.loads((root / "state.json").read_text())
    assert state["status"] == "done" and len(state["history"]) == ROUNDS
    df = load_trials(root)
    assert len(df) == ROUNDS * TRIALS and (df["status"] == "COMPLETE").all(), df.get("error")
    assert df.groupby("round")["projector_version"].unique().map(list).to_dict() == {0: [0], 1: [1]}
    units = unit_names(LAYERS, "matrix")
    assert all(df[f"policy/{u}"].notna().all() for u in units)
    assert (df["mean_sparsity"] >= 0.45 - 1e-9).all()
    projector = json.loads((root / "projector" / "projector-1.json").read_text())
    assert projector["steps"] == 2 and projector["loss_after"] == projector["loss_after"]  # finite, not NaN

    # 4. export the best trial; plain transformers reloads it with the measured sparsity
    best = json.loads((root / "best_policy.json").read_text())
    out_dir = export_experiment(root, tmp_path / "pruned")
    reloaded = family.model_class().from_pretrained(out_dir).eval()
    assert type(reloaded).__name__ == family.model_class_name
    unit_linears = {u.name: u.linears for u in prunable_units(reloaded, "matrix")}
    sparsity = measured_sparsity(reloaded, unit_linears)
    for unit, ratio in best["policy"].items():
        cols = reloaded.get_submodule(unit_linears[unit][0]).weight.shape[1]
        assert abs(sparsity[unit] - ratio) <= 1.0 / cols + 1e-6, (unit, sparsity[unit], ratio)
    record = json.loads((out_dir / "export.json").read_text())
    assert {u: v["measured"] for u, v in record["units"].items()} == pytest.approx(sparsity)
    assert saved_sparsity(out_dir, unit_linears)[0] == pytest.approx(sparsity)
    # the exported projector is the one the best trial ran with
    if best["projector_version"]:
        trained = load_file(str(root / "projector" / f"projector-{best['projector_version']}.safetensors"))
        assert all(torch.equal(trained[k], v) for k, v in projector_state(reloaded).items())
    TIMINGS[model_type] = time.perf_counter() - start
