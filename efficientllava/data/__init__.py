"""Task data: few-shot and held-out VQA sets in one schema, of one kind each (synthetic, ScienceQA, any VQA source)."""

from efficientllava.data.config import (
           DATASETS,
           KINDS,
           MULTIPLE_CHOICE,
           OPEN_ENDED,
           UNLABELLED,
           ColumnMap,
           DataConfig,
)
from efficientllava.data.scienceqa import load_scienceqa
from efficientllava.data.splits import TaskData, fewshot, load_task
from efficientllava.data.synthetic import make_synthetic

__all__ = ["DATASETS", "KINDS", "MULTIPLE_CHOICE", "OPEN_ENDED", "UNLABELLED", "ColumnMap", "DataConfig", "TaskData",
           "fewshot", "load_scienceqa", "load_task", "make_synthetic"]
