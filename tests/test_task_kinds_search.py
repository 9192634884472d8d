"""A 1-round x 2-trial search on the built-in tiny model for each task kind, on one Ray cluster.

Multiple choice, open ended with one answer, open ended with ten (VizWiz style) and unlabelled, with the
source form rotating across them (Hub-layout directory, parquet, JSONL + images, a plain image folder; CSV + images
loads in every kind in tests/test_vqa_data.py, and reaches the search through the same table code as parquet). Each search must finish, record the data
fingerprint, the fidelity and the task kind in every trial, and write the held-out figure of its kind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from vqa_sources import make_source

from efficientllava.config import load_config
from efficientllava.data import load_task
from efficientllava.report import write_report
from efficientllava.search.runner import run_search
from efficientllava.trials import load_trials

pytestmark = pytest.mark.slow

N_ROWS, SHOTS, HELDOUT, TRIALS = 28, 8, 16, 2
# (test id, source form, kind in the written file, data.kind, fidelity, held-out metric)
SEARCHES = [
    ("mc-hub-dir", "hub-dir", "mc", None, "accuracy", "accuracy"),
    ("open1-parquet", "parquet", "open1", None, "loglik", "exact_match"),
    ("open10-jsonl", "jsonl", "open10", None, "kl", "vqa_accuracy"),
    ("unlabelled-folder", "folder", "unlabelled", None, "kl", "agreement"),
]
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """Every search runs on the session's Ray cluster (conftest.ray_session)."""
    yield
    print("\nper-kind search seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in TIMINGS.items()))


def write_config(tmp_path: Path, source: str, data_kind: str | None, fidelity: str) -> Path:
    """A 1 x 2 search on the tiny model: layer granularity, magnitude pruning, no projector or evolution."""
    space = {"name": "kinds", "granularity": "layer", "levels": [0.0, 0.25, 0.5, 0.75],
             "budget": {"target": 0.5, "tolerance": 0.1}, "method": "magnitude"}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    data = {"dataset": "vqa", "source": source, "n_shots": SHOTS, "heldout_size": HELDOUT}
    if data_kind:
        data["kind"] = data_kind
    if source.endswith("images"):  # a plain image folder: one question for every image
        data["prompt"] = "what color is the shape ?"
    cfg = {"name": "kinds", "model": {"spec": "tiny", "dtype": "float32", "device": "cpu"}, "data": data,
           "space": str(tmp_path / "space.yaml"), "objective": {"fidelity": fidelity, "lam": 0.0},
           "search": {"rounds": 1, "trials_per_round": TRIALS, "max_concurrent": 1, "sampler": "random",
                      "uniform_first": False},
           "projector": {"enabled": False}, "evolution": {"enabled": False},
           "eval": {"batch_size": 16, "max_new_tokens": 4}, "storage": str(tmp_path / "runs")}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize(("form", "file_kind", "data_kind", "fidelity", "metric"),
                         [s[1:] for s in SEARCHES], ids=[s[0] for s in SEARCHES])
def test_search_per_kind(tmp_path, ray_cluster, form, file_kind, data_kind, fidelity, metric):
    start = time.perf_counter()
    source, _ = make_source(tmp_path / "data", form, file_kind, N_ROWS)
    cfg = load_config(write_config(tmp_path, source, data_kind, fidelity))
    task = load_task(cfg.data)
    root = run_search(cfg, tmp_path / f"exp-{form}")  # the driver actor is named after it: one per search

    df = load_trials(root)
    assert len(df) == TRIALS and (df["status"] == "COMPLETE").all(), df.get("error")
    # Provenance: the data fingerprint, the fidelity and the kind in every trial.
    assert set(df["fewshot"]) == {task.fingerprint} and set(df["fidelity"]) == {fidelity}
    assert set(df["kind"]) == {task.kind} and set(df["labelled"]) == {task.kind != "unlabelled"}
    assert df[fidelity].notna().all()

    heldout = json.loads((root / "heldout.json").read_text())
    assert set(heldout) == {"dense", "uniform", "best"}
    for name, row in heldout.items():
        assert row["metric"] == metric and 0.0 <= row[metric] <= 1.0 and row["n"] == len(task.heldout), name
    if metric == "agreement":  # unlabelled: the dense model against its own answers
        assert heldout["dense"]["agreement"] == 1.0 and "accuracy" not in heldout["best"]
        page = write_report(root, heldout).read_text()
        assert "agreement with dense" in page and "not accuracy" in page
    TIMINGS[form] = time.perf_counter() - start
