"""Which task, how many shots, which seed: the data section of an experiment."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    """Data section of an experiment: the task and how the few-shot / held-out splits are drawn."""

    dataset: str = "synthetic"  # "synthetic" | "scienceqa"
    source: str | None = None  # hub id or local path (scienceqa); None = the default source
    n_shots: int = 64
    seed: int = 0
    heldout_size: int | None = 512  # None = the whole held-out split
    fewshot_split: str = "train"
    heldout_split: str = "test"
