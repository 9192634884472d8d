"""Which task, where it comes from, how its columns map, how many shots: the data section of an experiment."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DATASETS = ("synthetic", "scienceqa", "vqa")
# Task kinds (see data/schema.py): multiple choice (options + answer index), open-ended (free-text
# reference answers, one or several per question), unlabelled (no answer at all).
MULTIPLE_CHOICE, OPEN_ENDED, UNLABELLED = "multiple_choice", "open_ended", "unlabelled"
KINDS = (MULTIPLE_CHOICE, OPEN_ENDED, UNLABELLED)


@dataclass(frozen=True)
class ColumnMap:
    """The data set's own column names for each schema field (None = look for the usual names).

    `options` is one list column, one text column of lettered options ("A. red\\nB. blue"), or
    several columns, one per option (MMBench's A, B, C, D). `answer` holds an index, a letter or
    the option text (multiple choice) or one reference answer (open-ended); `answers` holds
    several reference answers (a list of strings, or VQAv2 / VizWiz-style {answer: ...} records).
    """

    image: str | None = None
    question: str | None = None
    options: tuple[str, ...] | None = None
    answer: str | None = None
    answers: str | None = None
    context: str | None = None
    id: str | None = None
    qtype: str | None = None

    def given(self) -> dict[str, str | tuple[str, ...]]:
        """The explicitly mapped fields (what a missing-column error names)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class DataConfig:
    """Data section of an experiment: the task and how the few-shot / held-out splits are drawn."""

    dataset: str = "synthetic"  # "synthetic" | "scienceqa" | "vqa" (any data set, see data/vqa.py)
    source: str | None = None  # hub id or local path; None = the dataset's default (synthetic, scienceqa)
    subset: str | None = None  # a Hub dataset's configuration name (e.g. MMBench's "en"); vqa only
    columns: ColumnMap = ColumnMap()  # vqa only
    kind: str | None = None  # None = as the data is (synthetic: multiple_choice); else converted to this kind
    prompt: str | None = None  # the question of rows that have none (a plain image folder); vqa only
    n_shots: int = 64
    seed: int = 0
    heldout_size: int | None = 512  # None = the whole held-out split
    fewshot_split: str = "train"
    heldout_split: str = "test"

    def problem(self) -> str | None:
        """The first inconsistency between fields, as a message naming the key; None when there is none."""
        if self.dataset not in DATASETS:
            return f"data.dataset: unknown dataset {self.dataset!r}; use one of {', '.join(DATASETS)}"
        if self.n_shots < 1:
            return f"data.n_shots={self.n_shots} must be at least 1"
        if self.heldout_size is not None and self.heldout_size < 1:
            return f"data.heldout_size={self.heldout_size} must be at least 1, or null for the whole split"
        if self.kind is not None and self.kind not in KINDS:
            return f"data.kind={self.kind!r} is not a task kind; use one of {', '.join(KINDS)} (or leave it out)"
        vqa_only = {"subset": self.subset, "columns": self.columns.given() or None, "prompt": self.prompt}
        if self.dataset != "vqa":
            extra = [k for k, v in vqa_only.items() if v is not None]
            if self.dataset == "synthetic" and self.source is not None:
                extra.insert(0, "source")
            if extra:
                return (f"data.{extra[0]} does not apply to dataset: {self.dataset}; remove it "
                        "(or use dataset: vqa for your own data)")
        elif self.source is None:
            return "data.source is required for dataset: vqa (a Hub dataset id, a file or a folder)"
        for name, value in self.columns.given().items():
            names = (value,) if isinstance(value, str) else value
            if not names or any(not n for n in names):
                return f"data.columns.{name}: column names must not be empty"
        if self.prompt is not None and not self.prompt.strip():
            return "data.prompt must not be empty"
        return None

    def provenance(self) -> dict:
        """The fields that decide the few-shot set (what TaskData.fingerprint hashes besides its content)."""
        d = dataclasses.asdict(self)
        for key in ("heldout_size", "heldout_split"):  # they choose the held-out set only
            d.pop(key)
        return d

