"""The few-shot set and the held-out set of a task, drawn reproducibly from a DataConfig."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from efficientllava.data.config import DATASETS, MULTIPLE_CHOICE, DataConfig
from efficientllava.data.schema import convert_kind, detect_kind
from efficientllava.data.scienceqa import load_scienceqa, source_kind, source_label
from efficientllava.data.sources import open_source
from efficientllava.data.synthetic import make_synthetic
from efficientllava.data.vqa import VQAPool, load_pool
from efficientllava.errors import DataError

SYNTHETIC_HELDOUT = 512  # held-out size of the synthetic task when data.heldout_size is None

__all__ = ["DATASETS", "SYNTHETIC_HELDOUT", "TaskData", "fewshot", "fingerprint", "load_task"]


@dataclass(frozen=True)
class TaskData:
    """A task's few-shot set (search + projector training) and held-out set (final evaluation), of one kind."""

    fewshot: datasets.Dataset
    heldout: datasets.Dataset
    name: str
    fingerprint: str  # short hash of the data config and the few-shot rows in draw order: provenance, bank key
    kind: str = MULTIPLE_CHOICE  # multiple_choice | open_ended | unlabelled (data/schema.py)
    source: str = ""  # where the rows came from, as messages and reports name it

    @property
    def has_options(self) -> bool:
        """Whether the questions carry options (multiple choice, or unlabelled multiple-choice questions)."""
        return len(self.fewshot) > 0 and len(self.fewshot[0]["options"]) > 0


def fingerprint(parts: Sequence[str]) -> str:
    """A short stable hash of strings (order matters: for sample ids it is the draw order)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _row_digests(ds: datasets.Dataset) -> list[str]:
    """One digest per row over its text and its image's stored bytes (or file path, size and mtime)."""
    storage = ds.cast_column("image", datasets.Image(decode=False))
    out = []
    for row in storage:
        image = row["image"]
        if image["bytes"] is not None:
            image_key = hashlib.sha256(image["bytes"]).hexdigest()
        else:
            stat = Path(image["path"]).stat()
            image_key = f"{image['path']}|{stat.st_size}|{stat.st_mtime_ns}"
        text = {k: row[k] for k in ("id", "question", "context", "options", "answer", "answers")}
        out.append(json.dumps(text, sort_keys=True) + "|" + image_key)
    return out


def task_fingerprint(cfg: DataConfig, fewshot_set: datasets.Dataset) -> str:
    """The data fingerprint: the config fields that decide the few-shot set, then its rows' content in draw order."""
    return fingerprint([json.dumps(cfg.provenance(), sort_keys=True), *_row_digests(fewshot_set)])


def load_task(cfg: DataConfig) -> TaskData:
    """Draw the few-shot and held-out sets that `cfg` describes, both of one kind (cfg.kind, else the data's)."""
    problem = cfg.problem()
    if problem is not None:
        raise DataError(problem)
    if cfg.dataset == "synthetic":
        kind = cfg.kind or MULTIPLE_CHOICE
        fewshot_set = make_synthetic(cfg.n_shots, cfg.seed, "train", kind=kind)
        heldout = make_synthetic(cfg.heldout_size or SYNTHETIC_HELDOUT, cfg.seed, "heldout", kind=kind)
        where = "the synthetic task"
    elif cfg.dataset == "scienceqa":
        fewshot_set, heldout = _scienceqa(cfg)
        where = f"ScienceQA at {source_label(cfg.source)}"
        kind = detect_kind(fewshot_set, where)
        if len(heldout):
            detect_kind(heldout, where)
        fewshot_set, heldout = (convert_kind(d, kind, cfg.kind or kind, where) for d in (fewshot_set, heldout))
        kind = cfg.kind or kind
    else:
        fewshot_set, heldout, kind, where = _vqa(cfg)
    if len(heldout) == 0:
        raise DataError(
            f"data: the held-out set of {cfg.dataset} is empty; check data.heldout_split and data.source"
        )
    return TaskData(fewshot=fewshot_set, heldout=heldout, name=cfg.dataset,
                    fingerprint=task_fingerprint(cfg, fewshot_set), kind=kind, source=where)


def fewshot(cfg: DataConfig) -> datasets.Dataset:
    """The few-shot set that `cfg` describes (see load_task)."""
    return load_task(cfg).fewshot


def _check_shots(cfg: DataConfig, size: int, shared: bool, where: str, what: str) -> None:
    """n_shots must leave room in the pool (and one held-out sample when the pool is shared)."""
    if cfg.n_shots > size - (1 if shared else 0):
        room = f"{size} {what}" + (", and the held-out set needs at least one" if shared else "")
        raise DataError(f"data.n_shots={cfg.n_shots} but {where} has {room}; lower data.n_shots")


def _scienceqa(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Few-shot from cfg.fewshot_split, held-out from cfg.heldout_split; one pool split in two when they coincide."""
    pool = load_scienceqa(cfg.source, cfg.fewshot_split)
    where = f"the ScienceQA {cfg.fewshot_split} split at {source_label(cfg.source)}"
    # A single parquet file has no splits, and equal split names mean one pool: draw the few-shot set
    # first and hold out only the rest, so the two never share a question.
    shared = source_kind(cfg.source) == "file" or cfg.fewshot_split == cfg.heldout_split
    if shared:
        where = f"ScienceQA at {source_label(cfg.source)}"
    _check_shots(cfg, len(pool), shared, where, "image questions")
    order = np.random.default_rng(cfg.seed).permutation(len(pool))
    fewshot_set = pool.select(order[: cfg.n_shots])
    if shared:
        heldout = pool.select(np.sort(order[cfg.n_shots :]))
    else:
        heldout = load_scienceqa(cfg.source, cfg.heldout_split)
    return fewshot_set, _subsample(heldout, cfg.heldout_size, cfg.seed)


def _vqa(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset, str, str]:
    """Any VQA source (data/vqa.py): like ScienceQA's draw, with images checked on the drawn rows only."""
    assert cfg.source is not None  # DataConfig.problem() requires it
    source = open_source(cfg.source, cfg.subset)
    shared = not source.has_splits or cfg.fewshot_split == cfg.heldout_split
    pool = load_pool(source.read(cfg.fewshot_split if source.has_splits else None), cfg)
    where = pool.where if shared or not source.has_splits else f"the {cfg.fewshot_split} split of {cfg.source}"
    _check_shots(cfg, len(pool), shared, where, "samples")
    order = np.random.default_rng(cfg.seed).permutation(len(pool))
    fewshot_set = pool.take(order[: cfg.n_shots].tolist())
    held_pool: VQAPool = pool
    if shared:
        rest = np.sort(order[cfg.n_shots :])
    else:
        held_pool = load_pool(source.read(cfg.heldout_split), cfg)
        rest = np.arange(len(held_pool))
    if held_pool.kind != pool.kind:
        raise DataError(f"data: the few-shot split {cfg.fewshot_split} of {cfg.source} is "
                        f"{pool.kind.replace('_', '-')} but the held-out split {cfg.heldout_split} is "
                        f"{held_pool.kind.replace('_', '-')}; choose splits of one kind (data.heldout_split)")
    heldout = held_pool.take(_subsample_indices(rest, cfg.heldout_size, cfg.seed).tolist())
    kind = cfg.kind or pool.kind
    fewshot_set, heldout = (convert_kind(d, pool.kind, kind, cfg.source) for d in (fewshot_set, heldout))
    return fewshot_set, heldout, kind, cfg.source


def _subsample_indices(indices: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A seeded subset of `size` of `indices` (kept in order), or all of them when there are not more."""
    if size is None or size >= len(indices):
        return indices
    # A separate stream from the few-shot draw, so changing n_shots does not reshuffle the held-out set.
    pick = np.random.default_rng([seed, 1]).choice(len(indices), size, replace=False)
    return indices[np.sort(pick)]


def _subsample(ds: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """A seeded subset of `size` rows (kept in split order), or `ds` itself when it is not larger."""
    if size is None or size >= len(ds):
        return ds
    return ds.select(_subsample_indices(np.arange(len(ds)), size, seed))
