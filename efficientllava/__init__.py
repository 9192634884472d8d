"""EfficientLLaVA: generalisation-aware auto-pruning of LLaVA-style VLMs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__version__ = "0.2.0"  # the package version (pyproject reads it); 0.2: experiment format 2


def load_trials(path: str | Path) -> pd.DataFrame:
    """The trial table of an experiment directory as a pandas DataFrame (see `efficientllava.trials`)."""
    from efficientllava.trials import load_trials as _load_trials

    return _load_trials(path)
