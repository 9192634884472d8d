"""The held-out comparison of a search (`heldout.json`): written by the driver at the end of a search
(the problem computes it on a worker), read back by reports while it still describes the best trial."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from efficientllava.experiment import open_experiment
from efficientllava.log import get_logger

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
