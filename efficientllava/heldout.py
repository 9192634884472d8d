"""The held-out comparison of a search (`heldout.json`): written by the driver at the end of a search
(the problem computes it on a worker), read back by reports while it still describes the best trial.

Each entry names its figure in `metric` (the task's kind decides it: multiple-choice `accuracy`, open-ended
`exact_match` or `vqa_accuracy`, unlabelled `agreement` with the dense model's answers) and holds it under
that key; entries written before `metric` existed hold `accuracy`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from efficientllava.experiment import open_experiment
from efficientllava.scoring import METRIC_LABELS

HELDOUT_FILE = "heldout.json"


def saved_heldout(experiment_dir: str | Path) -> dict[str, Any] | None:
    """heldout.json when it still describes the current best trial (else None: it would mislead)."""
    exp = open_experiment(experiment_dir)
    if not (exp.heldout_path.is_file() and exp.best_policy_path.is_file()):
        return None
    heldout, current = json.loads(exp.heldout_path.read_text()), json.loads(exp.best_policy_path.read_text())
    best = heldout.get("best", {})
    same = (best.get("round"), best.get("number"), best.get("objective")) == (
        current.get("round"), current.get("number"), current.get("objective"))
    return heldout if same else None


def heldout_figure(entry: dict[str, Any]) -> tuple[str, float | None]:
    """(label, value) of an entry's main figure, e.g. ("agreement with dense", 0.97) or ("accuracy", 0.91)."""
    metric = entry.get("metric", "accuracy")
    value = entry.get(metric)
    return METRIC_LABELS.get(metric, metric), value if isinstance(value, (int, float)) else None


def heldout_lines(heldout: dict[str, Any]) -> list[str]:
    """One line per compared policy: its figure (labelled by metric), mean sparsity, FLOPs speed-up."""
    lines = []
    for name, row in heldout.items():
        label, value = heldout_figure(row)
        figures = [f"{label} {value:.4g}"] if value is not None else []
        figures += [f"{k.replace('_', ' ')} {row[k]:.4g}" for k in ("mean_sparsity", "flops_speedup")
                    if isinstance(row.get(k), (int, float))]
        lines.append(f"held-out {name:8s} " + "  ".join(figures))
    return lines
