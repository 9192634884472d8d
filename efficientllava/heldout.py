"""The held-out comparison of a search (`heldout.json`): written by the driver at the end of a search
(the problem computes it on a worker), read back by reports while it still describes the best trial."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from efficientllava.experiment import open_experiment

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
