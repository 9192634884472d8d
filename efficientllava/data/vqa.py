"""Any VQA data set in the sample schema: a column mapping, options in any common layout, answers in any form.

`load_pool` reads one split of a source (data/sources.py) and converts its text columns for every
row: the kind of each row is known, so a file that mixes kinds is reported at its first odd row.
Images stay undecoded until `VQAPool.take` selects the rows that are drawn and opens each once.

Accepted layouts (column names through `data.columns`, else the usual spellings):
- options: a list column; one text column or the question itself with lettered options, one per
  line ("A. red", "A) red", "(A) red") or inline ("... (A) red (B) blue"); or one column per
  option (MMBench's A, B, C, D; empty trailing cells mean fewer options);
- answer: an index (from 0), a letter ("B", "(B)") or the option's text for multiple choice; the
  reference answer for open-ended questions;
- answers: several reference answers, as a list of strings or of {answer: ...} records (VQAv2,
  VizWiz); JSON text in a CSV cell works too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from efficientllava.data.config import OPEN_ENDED, ColumnMap, DataConfig
from efficientllava.data.images import checked_images, image_storage, row_name
from efficientllava.data.schema import FEATURES, MAX_OPTIONS, NO_ANSWER, detect_kind
from efficientllava.data.sources import RawSplit
from efficientllava.errors import DataError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The usual spellings of each field, tried in order when data.columns does not name the column.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "img", "image_path", "file_name", "filename", "image_file"),
    "question": ("question", "query", "prompt"),
    "options": ("options", "choices"),
    "answer": ("answer", "label", "multiple_choice_answer"),
    "answers": ("answers",),
    "context": ("context", "hint"),
    "id": ("id", "question_id", "qid", "index"),
    "qtype": ("qtype", "question_type", "category", "answer_type"),
}
_LINE_OPTION = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):])\s*(.*?)\s*$")
_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*")
_ANSWER_LETTER = re.compile(r"^\(?([A-Z])[).:]?$")
_OPTIONS_HEADER = re.compile(r"(?:options|choices)\s*:?\s*$", re.IGNORECASE)
STORAGE_FEATURES = datasets.Features({**FEATURES, "image": datasets.Image(decode=False)})


@dataclass(frozen=True)
class VQAPool:
    """Every row of one split in the schema (images undecoded), and the split's one kind."""

    samples: datasets.Dataset
    kind: str
    where: str

    def __len__(self) -> int:
        return len(self.samples)

    def take(self, indices: Sequence[int]) -> datasets.Dataset:
        """The rows at `indices` (in that order), each image opened once; a broken one is a DataError naming its row."""
        picked = self.samples.select(indices)
        ids = list(self.samples["id"])
        images = checked_images(list(picked["image"]), list(indices), self.where, ids)
        text = picked.remove_columns("image")
        image = datasets.Dataset.from_dict({"image": images}, features=datasets.Features(
            {"image": datasets.Image(decode=False)}))
        merged = datasets.concatenate_datasets([text, image], axis=1).select_columns(list(FEATURES))
        return merged.cast_column("image", datasets.Image())


def split_lettered(text: str) -> tuple[str, list[str]]:
    """Split a question with lettered options into (question, options); ([text], []) when it has none."""
    lines = text.splitlines()
    for first, line in enumerate(lines):
        m = _LINE_OPTION.match(line)
        if not m or (m.group(1) or m.group(2)) != "A":
            continue
        options: list[str] = []
        for opt_line in lines[first:]:
            m = _LINE_OPTION.match(opt_line)
            if not m or (m.group(1) or m.group(2)) != LETTERS[len(options)]:
                break
            options.append(m.group(3))
        if len(options) >= 2:
            rest = lines[:first] + lines[first + len(options):]
            return _strip_header("\n".join(rest)), options
    parts = _INLINE_OPTION.split(text)  # [question, "A", "red ", "B", "blue"]
    if len(parts) >= 5 and parts[1::2] == list(LETTERS[: len(parts) // 2]):
        return _strip_header(parts[0]), [p.strip() for p in parts[2::2]]
    return text.strip(), []


def _strip_header(question: str) -> str:
    """Drop a trailing "Options:" / "Choices:" label left after the options were cut out."""
    return _OPTIONS_HEADER.sub("", question.strip()).strip()


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str)
                                                                                 and not value.strip())


def _text(value: Any) -> str:
    """A cell as text: "" when missing, integral floats without ".0"."""
    if _is_missing(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


class _Columns:
    """The data set's column for each schema field, resolved against the table's columns."""

    def __init__(self, names: Sequence[str], mapping: ColumnMap, where: str, prompt: str | None) -> None:
        given = mapping.given()
        for key, value in given.items():
            wanted = (value,) if isinstance(value, str) else value
            missing = [c for c in wanted if c not in names]
            if missing:
                raise DataError(f"{where}: data.columns.{key}={missing[0]!r} is not a column; "
                                f"columns: {', '.join(names)}")

        def pick(key: str) -> str | None:
            value = given.get(key)
            if isinstance(value, str):
                return value
            return next((c for c in DEFAULT_COLUMNS[key] if c in names), None)

        image = pick("image")
        if image is None:
            raise DataError(f"{where}: no image column (looked for {', '.join(DEFAULT_COLUMNS['image'])}); "
                            f"name yours with data.columns.image; columns: {', '.join(names)}")
        self.image: str = image
        self.question = pick("question")
        if self.question is None and prompt is None:
            raise DataError(f"{where}: no question column (looked for {', '.join(DEFAULT_COLUMNS['question'])}); "
                            "name yours with data.columns.question, or set data.prompt to ask every image "
                            "the same question")
        opts = given.get("options")
        if isinstance(opts, tuple) and len(opts) > 1:
            self.option_columns: tuple[str, ...] = opts
        elif isinstance(opts, tuple):
            self.option_columns = (opts[0],)
        else:
            found = next((c for c in DEFAULT_COLUMNS["options"] if c in names), None)
            letters = [c for c in LETTERS if c in names]
            letters = letters[: next((i for i, c in enumerate(letters) if c != LETTERS[i]), len(letters))]
            self.option_columns = (found,) if found else tuple(letters) if len(letters) >= 2 else ()
        self.answer, self.answers = pick("answer"), pick("answers")
        self.context, self.id, self.qtype = pick("context"), pick("id"), pick("qtype")

    def used(self) -> list[str]:
        """The table columns the conversion reads (the image column apart)."""
        cols = [self.question, *self.option_columns, self.answer, self.answers, self.context, self.id, self.qtype]
        return list(dict.fromkeys(c for c in cols if c is not None))


def _options(row: dict, cols: _Columns, n: int, where: str, ids: list[str]) -> tuple[list[str], str | None]:
    """(the row's options, [] when it has none; its question with lettered options cut out, or None when not cut)."""
    if len(cols.option_columns) > 1:  # one column per option
        values = [_text(row[c]) for c in cols.option_columns]
        while values and not values[-1]:
            values.pop()
        if "" in values:
            gap = cols.option_columns[values.index("")]
            raise DataError(f"{where}: {row_name(n, ids)}: option column {gap!r} is empty but a later one is not")
        return values, None
    if cols.option_columns:
        value = row[cols.option_columns[0]]
        if isinstance(value, (list, tuple)):
            return [_text(v) for v in value], None
        text = _text(value)
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: {row_name(n, ids)}: options {text[:40]!r} is not a JSON list ({e})") from e
            return [_text(v) for v in parsed], None
        return split_lettered(text)[1] if text else [], None
    if cols.question is None:
        return [], None
    question, options = split_lettered(_text(row[cols.question]))
    return options, question if options else None


def _references(value: Any) -> list[str]:
    """Reference answers from a list of strings or {answer: ...} records, JSON text of one, or one string."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, (list, tuple, np.ndarray)):
        refs = [_text(v.get("answer") if isinstance(v, dict) else v) for v in value]
        return [r for r in refs if r]
    if isinstance(value, dict):
        return _references([value])
    text = _text(value)
    return [text] if text else []


def _answer_index(value: Any, options: list[str], n: int, where: str, ids: list[str]) -> int:
    """The option index an answer names: the option's text, a letter, or an index from 0."""
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{where}: {row_name(n, ids)}: answer {value!r} is not an option index, letter or text")
    if isinstance(value, (int, np.integer)) or isinstance(value, float) and value.is_integer():
        index = int(value)
    else:
        text = _text(value)
        folded = [o.casefold() for o in options]
        letter = _ANSWER_LETTER.match(text)
        if text.casefold() in folded:
            return folded.index(text.casefold())
        if letter:
            index = LETTERS.index(letter.group(1))
            if index >= len(options):
                raise DataError(f"{where}: {row_name(n, ids)}: answer letter {letter.group(1)} is out of range "
                                f"for {len(options)} options")
            return index
        if not re.fullmatch(r"-?\d+", text):
            raise DataError(f"{where}: {row_name(n, ids)}: answer {text!r} is not an option index (from 0), "
                            f"letter or text; options: {', '.join(options)}")
        index = int(text)
    if not 0 <= index < len(options):
        raise DataError(f"{where}: {row_name(n, ids)}: answer index {index} is out of range for "
                        f"{len(options)} options (indices count from 0)")
    return index


def _convert(raw: RawSplit, cols: _Columns, cfg: DataConfig) -> dict[str, list]:
    """The schema's text columns for every row of `raw`."""
    where, used = raw.where, cols.used()
    given = [_text(v) for v in raw.table[cols.id]] if cols.id else [""] * len(raw.table)
    ids = [v or f"{raw.name}-{i}" for i, v in enumerate(given)]
    out: dict[str, list] = {k: [] for k in ("id", "question", "context", "options", "answer", "answers", "qtype")}
    want_open = cfg.kind == OPEN_ENDED
    rows = iter(raw.table.select_columns(used)) if used else ({} for _ in range(len(raw.table)))
    for n, row in enumerate(rows):
        options, cut_question = _options(row, cols, n, where, ids)
        refs = _references(row[cols.answers]) if cols.answers else []
        answer_value = row[cols.answer] if cols.answer else None
        if options and want_open and refs:
            # The open-ended form of a data set that has both (A-OKVQA's choices and direct answers).
            options, cut_question = [], None
        question = cut_question if cut_question is not None else _text(row[cols.question]) if cols.question else ""
        if options and len(options) > MAX_OPTIONS:
            raise DataError(f"{where}: {row_name(n, ids)} has {len(options)} options; at most {MAX_OPTIONS}")
        if options and len(options) < 2:
            raise DataError(f"{where}: {row_name(n, ids)} has one option ({options[0]!r}); "
                            "multiple choice needs two or more")
        index = NO_ANSWER
        if options:
            if isinstance(answer_value, (list, tuple, np.ndarray)):
                raise DataError(f"{where}: {row_name(n, ids)}: a multiple-choice answer must be one value, "
                                f"got {list(answer_value)!r}")
            if not _is_missing(answer_value):
                index = _answer_index(answer_value, options, n, where, ids)
            elif refs:
                raise DataError(f"{where}: {row_name(n, ids)} has options and reference answers but no answer "
                                "index; name the answer column with data.columns.answer, or set "
                                "data.kind: open_ended to use the reference answers")
        elif not refs and not _is_missing(answer_value):
            refs = _references(answer_value)
        out["id"].append(ids[n])
        out["question"].append(question or (cfg.prompt or ""))
        out["context"].append(_text(row[cols.context]) if cols.context else "")
        out["options"].append(options)
        out["answer"].append(index)
        out["answers"].append([] if options else refs)
        out["qtype"].append(_text(row[cols.qtype]) if cols.qtype else "")
        if not out["question"][-1]:
            raise DataError(f"{where}: {row_name(n, ids)} has an empty question; fill it, or set data.prompt "
                            "for rows without one")
    return out


def load_pool(raw: RawSplit, cfg: DataConfig) -> VQAPool:
    """Convert every row of `raw` to the schema (images undecoded) and find the split's one kind."""
    cols = _Columns(raw.table.column_names, cfg.columns, raw.where, cfg.prompt)
    text = _convert(raw, cols, cfg)
    images = image_storage(raw.table, cols.image, raw.base_dir, raw.where, text["id"])
    text_ds = datasets.Dataset.from_dict(text, features=datasets.Features(
        {k: v for k, v in STORAGE_FEATURES.items() if k != "image"}))
    samples = datasets.concatenate_datasets([text_ds, images], axis=1).select_columns(list(FEATURES))
    kind = detect_kind(samples, raw.where)
    return VQAPool(samples, kind, raw.where)


__all__ = ["DEFAULT_COLUMNS", "VQAPool", "load_pool", "split_lettered"]
