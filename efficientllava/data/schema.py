"""The one sample schema every task is converted to, in three kinds.

- multiple choice: `options` (2-26) and `answer`, an index into them; `answers` empty;
- open-ended: no options, `answer` -1, `answers` the reference answers (one, or several as in
  VQAv2 / VizWiz, where VQA accuracy counts how many annotators gave an answer);
- unlabelled: no answer at all (`answer` -1, `answers` empty); options are kept where the data
  has them (then on every row), so label-free scoring can still compare option letters.

A data set has one kind; TaskData carries it.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets

from efficientllava.data.config import KINDS, MULTIPLE_CHOICE, OPEN_ENDED, UNLABELLED
from efficientllava.errors import DataError

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "context": datasets.Value("string"),  # "" when the task has none (ScienceQA's hint)
        "options": datasets.Sequence(datasets.Value("string")),  # [] for open-ended questions
        "answer": datasets.Value("int64"),  # index into options; -1 when there is none
        "answers": datasets.Sequence(datasets.Value("string")),  # reference answers of open-ended questions
        "qtype": datasets.Value("string"),  # question type / category, for per-type reports
    }
)
REQUIRED = tuple(FEATURES)
MAX_OPTIONS = 26
NO_ANSWER = -1

__all__ = ["FEATURES", "KINDS", "MAX_OPTIONS", "NO_ANSWER", "REQUIRED", "convert_kind", "detect_kind",
           "row_kind", "validate_samples"]


def row_kind(options: Sequence[str], answer: int, answers: Sequence[str]) -> str:
    """The kind one row belongs to (an answer index with options, reference answers, or neither)."""
    if answer != NO_ANSWER:
        return MULTIPLE_CHOICE
    return OPEN_ENDED if answers else UNLABELLED


def _where(ids: Sequence[str], row: int) -> str:
    return f"row {row} (id {ids[row]})" if ids[row] else f"row {row}"


def detect_kind(ds: datasets.Dataset, source: str) -> str:
    """Check every row of `ds` against its kind and return the one kind of the data set.

    Raises DataError naming `source` and the first offending row: a row of another kind than
    row 0 (mixed kinds), an answer index out of range, options on some unlabelled rows only.
    """
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}; have {', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise DataError(f"{source}: no samples")
    ids = list(ds["id"])
    rows = zip(ds["options"], ds["answer"], ds["answers"], strict=True)
    kind = has_options = None
    for row, (opts, ans, refs) in enumerate(rows):
        this = row_kind(opts, ans, refs)
        if this == MULTIPLE_CHOICE and (not 2 <= len(opts) <= MAX_OPTIONS or not 0 <= ans < len(opts)):
            raise DataError(f"{source}: {_where(ids, row)} has {len(opts)} options and answer index {ans}")
        if this == OPEN_ENDED and opts:
            raise DataError(f"{source}: {_where(ids, row)} has options and reference answers but no answer index")
        if kind is None:
            kind, has_options = this, bool(opts)
        elif this != kind:
            raise DataError(f"{source}: {_where(ids, row)} is {this.replace('_', '-')} but row 0 is "
                            f"{kind.replace('_', '-')}; one data set holds one kind of question")
        elif kind == UNLABELLED and bool(opts) != has_options:
            raise DataError(f"{source}: {_where(ids, row)} {'has' if opts else 'has no'} options but row 0 "
                            f"{'has' if has_options else 'has none'}; give every question options, or none")
    assert kind is not None
    return kind


def validate_samples(ds: datasets.Dataset, source: str) -> datasets.Dataset:
    """Check `ds` has the schema's columns and rows of one kind with sane answers; raise DataError naming `source`."""
    detect_kind(ds, source)
    return ds


def convert_kind(ds: datasets.Dataset, have: str, want: str, source: str) -> datasets.Dataset:
    """`ds` (of kind `have`) as kind `want`: multiple choice -> open-ended (the right option's text is
    the reference answer), or any kind -> unlabelled (answers dropped, options kept)."""
    if have == want:
        return ds
    if want == MULTIPLE_CHOICE or (have == UNLABELLED and want == OPEN_ENDED):
        raise DataError(f"data.kind={want} but {source} is {have.replace('_', '-')}: it has no "
                        f"{'options' if want == MULTIPLE_CHOICE else 'answers'} to make {want} questions from")
    if want == OPEN_ENDED:  # have == MULTIPLE_CHOICE
        def to_open(options: list[list[str]], answer: list[int]) -> dict:
            n = len(answer)
            refs = [[opts[a]] for opts, a in zip(options, answer, strict=True)]
            return {"options": [[] for _ in range(n)], "answer": [NO_ANSWER] * n, "answers": refs}

        return ds.map(to_open, batched=True, input_columns=["options", "answer"], features=ds.features,
                      desc=f"{have} -> {want}")

    def to_unlabelled(answer: list[int]) -> dict:
        n = len(answer)
        return {"answer": [NO_ANSWER] * n, "answers": [[] for _ in range(n)]}

    return ds.map(to_unlabelled, batched=True, input_columns=["answer"], features=ds.features,
                  desc=f"{have} -> {want}")
