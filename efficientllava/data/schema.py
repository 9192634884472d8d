"""The one sample schema every task is converted to: a multiple-choice visual question."""

from __future__ import annotations

import datasets

from efficientllava.errors import DataError

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "context": datasets.Value("string"),  # "" when the task has none (ScienceQA's hint)
        "options": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("int64"),  # index into options
        "qtype": datasets.Value("string"),  # question type / category, for per-type reports
    }
)
REQUIRED = tuple(FEATURES)
MAX_OPTIONS = 26


def validate_samples(ds: datasets.Dataset, source: str) -> datasets.Dataset:
    """Check `ds` has the schema's columns and sane answers; raise DataError naming `source`."""
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}; have {', '.join(ds.column_names)}")
    for row, (opts, ans) in enumerate(zip(ds["options"], ds["answer"], strict=True)):
        if not 2 <= len(opts) <= MAX_OPTIONS or not 0 <= ans < len(opts):
            raise DataError(f"{source}: row {row} has {len(opts)} options and answer index {ans}")
    return ds
