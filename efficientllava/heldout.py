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
from efficientllava.log import get_logger
from efficientllava.scoring import METRIC_LABELS

log = get_logger(__name__)

HELDOUT_FILE = "heldout.json"


def _read(path: Path, todo: str) -> dict[str, Any] | None:
    """A JSON object from a derived file; a damaged one is one warning line and None (it is rebuilt elsewhere)."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        log.warning(f"{path}: damaged ({type(exc).__name__}); {todo}")
        return None
    return data


def saved_heldout(experiment_dir: str | Path) -> dict[str, Any] | None:
    """heldout.json when it still describes the current best trial (else None: it would mislead)."""
    exp = open_experiment(experiment_dir)
    if not (exp.heldout_path.is_file() and exp.best_policy_path.is_file()):
        return None
    heldout = _read(exp.heldout_path, f"rerun `efficientllava report {exp.root} --heldout` to recompute it "
                    "(the report leaves the held-out comparison out until then)")
    current = _read(exp.best_policy_path, "rebuilt from the trial records here (it is written again at the end "
                    "of a search)")
    if current is None:
        from efficientllava.trials import best_record

        rec = best_record(exp.root) or {}
        current = {k: rec.get(k) for k in ("round", "number", "objective")}
    if heldout is None:
        return None
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
