"""Data files of every source form in every task kind, written by tests (imported as `vqa_sources`): the
rows are synthetic ones, so what a loader reads back can be checked against them."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
from PIL import Image

from efficientllava.data.synthetic import generate

LETTERS = "ABCD"
N = 12  # rows per file
FORMS = ("hub-dir", "parquet", "jsonl", "csv", "folder")
KINDS = ("mc", "open1", "open10", "unlabelled")  # the folder form is unlabelled only (images, no index)


def truth(n: int = N, seed: int = 0) -> list[dict]:
    """Synthetic rows with ids q<seed>-<i>: the ground truth every written file is checked against."""
    rows = generate(n, seed, "train")
    for i, r in enumerate(rows):
        r["id"] = f"q{seed}-{i}"
        r["word"] = r["options"][r["answer"]]
        # Ten annotators, the right word 7 times (VizWiz style); row-dependent so rows differ.
        r["refs"] = [r["word"]] * 7 + ["unanswerable", "blue", r["options"][(r["answer"] + 1) % 4]]
    return rows


def record(r: dict, kind: str, fmt: str, image) -> dict:
    """One row of a file of `kind` in format fmt (parquet / jsonl / csv), with the image as given."""
    rec = {"id": r["id"], "image": image, "question": r["question"]}
    if kind == "mc":
        if fmt == "csv":  # CSV cells hold no lists: one column per option, the answer as a letter
            rec.update({letter: o for letter, o in zip(LETTERS, r["options"], strict=True)})
            rec["answer"] = LETTERS[r["answer"]]
        elif fmt == "jsonl":  # options as lettered text in the question, the answer as the option text
            rec["question"] = r["question"] + "\n" + "\n".join(f"{k}. {o}" for k, o in zip(LETTERS, r["options"],
                                                                                            strict=False))
            rec["answer"] = r["word"]
        else:  # a list column and an index
            rec.update(options=r["options"], answer=r["answer"])
    elif kind == "open1":
        rec["answer"] = r["word"]
    elif kind == "open10":
        refs = r["refs"]
        rec["answers"] = json.dumps(refs) if fmt == "csv" else (
            [{"answer": a, "answer_confidence": "yes"} for a in refs] if fmt == "jsonl" else refs)
    return rec


def write_table(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        ds = datasets.Dataset.from_list(records)
        for key, value in records[0].items():
            if isinstance(value, Image.Image):
                ds = ds.cast_column(key, datasets.Image())
        ds.to_parquet(str(path))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        datasets.Dataset.from_list(records).to_csv(str(path), index=False)
    return path


def save_images(rows: list[dict], folder: Path) -> list[str]:
    """Save each row's image as images/<id>.png under `folder`; return the paths relative to it."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for r in rows:
        r["image"].save(folder / "images" / f"{r['id']}.png")
        names.append(f"images/{r['id']}.png")
    return names


def make_source(tmp_path: Path, form: str, kind: str, n: int = N) -> tuple[str, list[dict]]:
    """Write rows of `kind` in source form `form`; return data.source and the ground-truth rows."""
    rows = truth(n)
    if form == "hub-dir":  # data/train-*.parquet and data/test-*.parquet with embedded images
        root = tmp_path / "hub"
        for split, part in (("train", rows[: n * 2 // 3]), ("test", rows[n * 2 // 3 :])):
            write_table(root / "data" / f"{split}-00000-of-00001.parquet",
                        [record(r, kind, "parquet", r["image"]) for r in part])
        return str(root), rows
    if form == "parquet":
        return str(write_table(tmp_path / "tasks.parquet", [record(r, kind, "parquet", r["image"]) for r in rows])), rows
    if form in ("jsonl", "csv"):  # an index next to an images folder (paths relative to the index)
        folder = tmp_path / form
        names = save_images(rows, folder)
        path = write_table(folder / f"index.{form}", [record(r, kind, form, name)
                                                            for r, name in zip(rows, names, strict=True)])
        return str(path), rows
    folder = tmp_path / "photos"  # a plain image folder
    save_images(rows, folder)
    return str(folder / "images"), rows
