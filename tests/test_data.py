"""Task data: ScienceQA loading (local copies in the Hub layout), few-shot / held-out draws, bad inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
from PIL import Image

from efficientllava.data import DATASETS, DataConfig, TaskData, fewshot, load_scienceqa, load_task
from efficientllava.data.schema import FEATURES
from efficientllava.errors import DataError

# The column layout of derek-thomas/ScienceQA (its README's dataset_info).
TEXT = ("hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")
RAW_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("int8"),
        **{name: datasets.Value("string") for name in TEXT},
    }
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep the `datasets` cache of each test inside its tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _row(split: str, i: int, with_image: bool) -> dict:
    n_choices = 2 + i % 3
    return {
        "image": Image.new("RGB", (8, 8), (i * 20 % 256, 7, 99)) if with_image else None,
        "question": f"{split} question {i}?",
        "choices": [f"{split}-{i}-choice-{k}" for k in range(n_choices)],
        "answer": i % n_choices,
        "hint": f"hint {i}" if i % 3 else "",
        "task": "closed choice",
        "grade": "grade5",
        "subject": "natural science",
        "topic": "physics",
        "category": "" if i % 4 == 0 else f"category {i % 2}",  # some rows lack a category
        "skill": "skill",
        "lecture": "",
        "solution": "",
    }


def _rows(split: str, n: int) -> list[dict]:
    # Every third row is a text-only question (image None), as in the real data.
    return [_row(split, i, with_image=i % 3 != 1) for i in range(n)]


def _write(path: Path, rows: list[dict], features: datasets.Features = RAW_FEATURES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


@pytest.fixture
def sqa(tmp_path) -> Path:
    """A small ScienceQA copy in the Hub repo's layout: 18 train rows (12 with images), 9 test rows (6)."""
    root = tmp_path / "ScienceQA"
    _write(root / "data" / "train-00000-of-00001-1028f23e.parquet", _rows("train", 18))
    _write(root / "data" / "test-00000-of-00001-f0e719df.parquet", _rows("test", 9))
    (root / "README.md").write_text("local copy\n")
    return root


def _content(ds: datasets.Dataset) -> set[str]:
    return {
        hashlib.sha1(
            r["image"].tobytes() + r["question"].encode() + "|".join(r["options"]).encode()
        ).hexdigest()
        for r in ds
    }


# ---------------------------------------------------------------- load_scienceqa


def test_local_dir_keeps_image_questions_and_maps_columns(sqa):
    ds = load_scienceqa(str(sqa), "train")
    image_rows = [i for i in range(18) if i % 3 != 1]
    assert ds.features == FEATURES
    assert list(ds["id"]) == [f"scienceqa-train-{i}" for i in image_rows]
    for i, r in zip(image_rows, ds, strict=True):
        raw = _row("train", i, with_image=True)
        assert isinstance(r["image"], Image.Image) and r["image"].getpixel((0, 0)) == raw["image"].getpixel(
            (0, 0)
        )
        assert r["question"] == raw["question"]
        assert r["options"] == raw["choices"] and r["answer"] == raw["answer"]
        assert r["context"] == raw["hint"]
        assert r["qtype"] == (raw["category"] or "natural science")  # falls back to the subject


def test_top_level_split_file_is_accepted(tmp_path):
    _write(tmp_path / "flat" / "test.parquet", _rows("test", 6))
    ds = load_scienceqa(str(tmp_path / "flat"), "test")
    assert list(ds["id"]) == ["scienceqa-test-0", "scienceqa-test-2", "scienceqa-test-3", "scienceqa-test-5"]


def test_single_parquet_file_ignores_split(sqa):
    path = next((sqa / "data").glob("test-*.parquet"))
    ds = load_scienceqa(str(path), split="no-such-split")
    assert list(ds["id"]) == [f"scienceqa-test-{i}" for i in range(9) if i % 3 != 1]
    assert all(isinstance(img, Image.Image) for img in ds["image"])


def test_missing_image_column_names_file_and_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "image"} for r in _rows("train", 4)]
    features = datasets.Features({k: v for k, v in RAW_FEATURES.items() if k != "image"})
    path = _write(tmp_path / "noimg" / "data" / "train-00000-of-00001.parquet", rows, features)
    with pytest.raises(DataError, match=r"missing column\(s\) image") as err:
        load_scienceqa(str(tmp_path / "noimg"), "train")
    assert str(path) in str(err.value)


def test_unknown_split_lists_available_splits(sqa):
    with pytest.raises(DataError, match="unknown split 'validation'; available splits: test, train"):
        load_scienceqa(str(sqa), "validation")


def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_scienceqa(str(tmp_path / "nowhere" / "x.parquet"))


def test_unreachable_hub_id_gives_predownload_hint(monkeypatch):
    # `datasets` and `huggingface_hub` read these variables at import time: patch their constants too.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_scienceqa("no-such-owner-1f3a/no-such-scienceqa", "train")
    msg = str(err.value)
    assert "no-such-owner-1f3a/no-such-scienceqa" in msg and "\n" not in msg
    assert "hf download --repo-type dataset no-such-owner-1f3a/no-such-scienceqa --local-dir DIR" in msg
    assert "data.source" in msg


def test_hub_source_picks_the_split_of_the_cached_dataset(sqa, monkeypatch):
    # Stands in for a pre-populated cache: load_dataset(hub id) returns all splits.
    splits = {s: str(next((sqa / "data").glob(f"{s}-*.parquet"))) for s in ("train", "test")}
    local = datasets.load_dataset("parquet", data_files=splits)
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: calls.append(path) or local)
    assert list(load_scienceqa(None, "test")["id"])[:2] == ["scienceqa-test-0", "scienceqa-test-2"]
    assert calls == ["derek-thomas/ScienceQA"]
    with pytest.raises(
        DataError, match="derek-thomas/ScienceQA: unknown split 'dev'; available splits: train, test"
    ):
        load_scienceqa(None, "dev")


# ---------------------------------------------------------------- load_task


def _sqa_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(
        **{"dataset": "scienceqa", "source": str(root), "n_shots": 4, "heldout_size": None, **kw}
    )


def test_scienceqa_task_draws_are_seeded_and_disjoint(sqa):
    a, b, c = (load_task(_sqa_cfg(sqa, seed=s)) for s in (0, 0, 1))
    assert isinstance(a, TaskData) and a.name == "scienceqa"
    assert len(a.fewshot) == 4 and len(a.heldout) == 6
    assert list(a.fewshot["id"]) == list(b.fewshot["id"]) and a.fingerprint == b.fingerprint
    assert list(a.fewshot["id"]) != list(c.fewshot["id"]) and a.fingerprint != c.fingerprint
    assert all(i.startswith("scienceqa-train-") for i in a.fewshot["id"])
    assert all(i.startswith("scienceqa-test-") for i in a.heldout["id"])
    assert not _content(a.fewshot) & _content(a.heldout)
    assert len(a.fingerprint) == 12
    assert list(fewshot(_sqa_cfg(sqa, seed=0))["id"]) == list(a.fewshot["id"])


def test_heldout_is_subsampled_with_the_seed(sqa):
    a, b = (load_task(_sqa_cfg(sqa, heldout_size=3, seed=5)) for _ in range(2))
    assert len(a.heldout) == 3 and list(a.heldout["id"]) == list(b.heldout["id"])
    assert set(a.heldout["id"]) <= {f"scienceqa-test-{i}" for i in range(9)}


def test_single_file_source_splits_one_pool_disjointly(sqa):
    path = next((sqa / "data").glob("train-*.parquet"))
    task = load_task(_sqa_cfg(path, n_shots=5))
    assert len(task.fewshot) == 5 and len(task.heldout) == 12 - 5
    assert not set(task.fewshot["id"]) & set(task.heldout["id"])
    with pytest.raises(DataError, match="held-out set needs at least one"):
        load_task(_sqa_cfg(path, n_shots=12))


def test_n_shots_larger_than_the_split(sqa):
    with pytest.raises(DataError) as err:
        load_task(_sqa_cfg(sqa, n_shots=13))
    assert str(err.value) == (
        f"data.n_shots=13 but the ScienceQA train split at {sqa} has 12 image questions; lower data.n_shots"
    )


def test_empty_heldout_split(sqa):
    _write(sqa / "data" / "val-00000-of-00001.parquet", [_row("val", i, with_image=False) for i in range(3)])
    with pytest.raises(DataError, match="held-out set of scienceqa is empty"):
        load_task(_sqa_cfg(sqa, heldout_split="val"))


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"dataset": "vizwiz"}, "unknown dataset 'vizwiz'; use one of synthetic, scienceqa"),
        ({"n_shots": 0}, "n_shots=0 must be at least 1"),
        ({"heldout_size": 0}, "heldout_size=0 must be at least 1"),
    ],
)
def test_bad_configs(kw, pattern):
    with pytest.raises(DataError, match=pattern):
        load_task(DataConfig(**kw))


def test_synthetic_task_is_seeded_and_disjoint():
    cfg = DataConfig(dataset="synthetic", n_shots=16, heldout_size=32, seed=3)
    a, b = load_task(cfg), load_task(cfg)
    other = load_task(DataConfig(dataset="synthetic", n_shots=16, heldout_size=32, seed=4))
    assert a.name == "synthetic" and DATASETS == ("synthetic", "scienceqa", "vqa")
    assert (len(a.fewshot), len(a.heldout)) == (16, 32)
    assert a.fewshot.features == FEATURES and a.heldout.features == FEATURES
    assert list(a.fewshot["id"]) == list(b.fewshot["id"]) and a.fingerprint == b.fingerprint
    assert a.fingerprint != other.fingerprint
    assert not set(a.fewshot["id"]) & set(a.heldout["id"])
    assert not _content(a.fewshot) & _content(a.heldout)
