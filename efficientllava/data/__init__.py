"""Task data: few-shot and held-out multiple-choice VQA sets in one schema (synthetic, ScienceQA)."""

from efficientllava.data.config import DataConfig
from efficientllava.data.scienceqa import load_scienceqa
from efficientllava.data.splits import DATASETS, TaskData, fewshot, load_task
from efficientllava.data.synthetic import make_synthetic

__all__ = ["DATASETS", "DataConfig", "TaskData", "fewshot", "load_scienceqa", "load_task", "make_synthetic"]
