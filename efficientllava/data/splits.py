"""The few-shot set and the held-out set of a task, drawn reproducibly from a DataConfig."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import datasets
import numpy as np

from efficientllava.data.config import DataConfig
from efficientllava.data.scienceqa import load_scienceqa, source_kind, source_label
from efficientllava.data.synthetic import make_synthetic
from efficientllava.errors import DataError

DATASETS = ("synthetic", "scienceqa")
SYNTHETIC_HELDOUT = 512  # held-out size of the synthetic task when data.heldout_size is None


@dataclass(frozen=True)
class TaskData:
    """A task's few-shot set (search + projector training) and held-out set (final evaluation)."""

    fewshot: datasets.Dataset
    heldout: datasets.Dataset
    name: str
    fingerprint: str  # short hash of the few-shot ids, in draw order: provenance for trial tables


def fingerprint(ids: list[str]) -> str:
    """A short stable hash of sample ids (order matters: it is the draw order)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]


def load_task(cfg: DataConfig) -> TaskData:
    """Draw the few-shot and held-out sets that `cfg` describes."""
    if cfg.dataset not in DATASETS:
        raise DataError(f"data.dataset: unknown dataset {cfg.dataset!r}; use one of {', '.join(DATASETS)}")
    if cfg.n_shots < 1:
        raise DataError(f"data.n_shots={cfg.n_shots} must be at least 1")
    if cfg.heldout_size is not None and cfg.heldout_size < 1:
        raise DataError(
            f"data.heldout_size={cfg.heldout_size} must be at least 1, or null for the whole split"
        )
    if cfg.dataset == "synthetic":
        fewshot = make_synthetic(cfg.n_shots, cfg.seed, "train")
        heldout = make_synthetic(cfg.heldout_size or SYNTHETIC_HELDOUT, cfg.seed, "heldout")
    else:
        fewshot, heldout = _scienceqa(cfg)
    if len(heldout) == 0:
        raise DataError(
            f"data: the held-out set of {cfg.dataset} is empty; check data.heldout_split and data.source"
        )
    return TaskData(
        fewshot=fewshot, heldout=heldout, name=cfg.dataset, fingerprint=fingerprint(list(fewshot["id"]))
    )


def fewshot(cfg: DataConfig) -> datasets.Dataset:
    """The few-shot set that `cfg` describes (see load_task)."""
    return load_task(cfg).fewshot


def _scienceqa(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Few-shot from cfg.fewshot_split, held-out from cfg.heldout_split; one pool split in two when they coincide."""
    pool = load_scienceqa(cfg.source, cfg.fewshot_split)
    where = f"the ScienceQA {cfg.fewshot_split} split at {source_label(cfg.source)}"
    # A single parquet file has no splits, and equal split names mean one pool: draw the few-shot set
    # first and hold out only the rest, so the two never share a question.
    shared = source_kind(cfg.source) == "file" or cfg.fewshot_split == cfg.heldout_split
    if shared:
        where = f"ScienceQA at {source_label(cfg.source)}"
    if cfg.n_shots > len(pool) - (1 if shared else 0):
        room = f"{len(pool)} image questions" + (
            ", and the held-out set needs at least one" if shared else ""
        )
        raise DataError(f"data.n_shots={cfg.n_shots} but {where} has {room}; lower data.n_shots")
    order = np.random.default_rng(cfg.seed).permutation(len(pool))
    fewshot = pool.select(order[: cfg.n_shots])
    if shared:
        heldout = pool.select(np.sort(order[cfg.n_shots :]))
    else:
        heldout = load_scienceqa(cfg.source, cfg.heldout_split)
    return fewshot, _subsample(heldout, cfg.heldout_size, cfg.seed)


def _subsample(ds: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """A seeded subset of `size` rows (kept in split order), or `ds` itself when it is not larger."""
    if size is None or size >= len(ds):
        return ds
    # A separate stream from the few-shot draw, so changing n_shots does not reshuffle the held-out set.
    pick = np.random.default_rng([seed, 1]).choice(len(ds), size, replace=False)
    return ds.select(np.sort(pick))
