"""One loaded model + task + encoded batches + cost model: what scoring, trials and the CLI share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from efficientllava.config import ModelConfig
from efficientllava.data import MULTIPLE_CHOICE, DataConfig, TaskData, load_task
from efficientllava.errors import DataError
from efficientllava.models import LoadedModel, load_model
from efficientllava.prompting import encode_batches
from efficientllava.pruning.bank import BankSpec, VariantBank, open_or_build
from efficientllava.pruning.units import num_decoder_layers
from efficientllava.scoring.cost import CostModel
from efficientllava.scoring.objective import DEFAULT_FIDELITY, PolicyScorer
from efficientllava.scoring.srm import SRMConfig
from efficientllava.space import SearchSpace, check_band


@dataclass
class Pipeline:
    """A live model with its few-shot set encoded once on its device (reused by every trial)."""

    loaded: LoadedModel
    task: TaskData
    batch_size: int
    fewshot_batches: list[dict[str, torch.Tensor]]
    _heldout: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def model(self) -> torch.nn.Module:
        """The loaded model."""
        return self.loaded.model

    @property
    def num_layers(self) -> int:
        """Decoder layers of the language model."""
        return num_decoder_layers(self.model)

    def encode(self, dataset: datasets.Dataset) -> list[dict[str, torch.Tensor]]:
        """Encode any schema dataset for this model."""
        return encode_batches(self.loaded.processor, dataset, self.batch_size, self.loaded.prompt_format,
                              self.loaded.device, self.loaded.dtype, family=self.loaded.family)

    @property
    def heldout_batches(self) -> list[dict[str, torch.Tensor]]:
        """The held-out split, encoded on first use."""
        if self._heldout is None:
            self._heldout = self.encode(self.task.heldout)
        return self._heldout

    def tokens_per_sample(self) -> int:
        """Mean LLM sequence length of the few-shot samples (image tokens included)."""
        total = sum(int(b["attention_mask"].sum()) for b in self.fewshot_batches)
        return max(1, round(total / max(1, sum(len(b["answers"]) for b in self.fewshot_batches))))

    def cost_model(self, granularity: str) -> CostModel:
        """Cost model of this model at `granularity`, for samples like the few-shot ones."""
        return CostModel.from_batches(self.model, granularity, self.fewshot_batches)

    def bank_spec(self, space: SearchSpace) -> BankSpec:
        """The variant-bank spec that covers every level `space` can choose."""
        units = space.unit_names(self.num_layers)
        return BankSpec(space.granularity, tuple((u, space.levels_for(u)) for u in units), space.method,
                        space.pattern, space.method_options)

    def bank(self, space: SearchSpace, banks_dir: Path, projector_version: int = 0, log: bool = True) -> VariantBank:
        """Open the bank for (space, few-shot set, projector version) under `banks_dir`, building it once.

        The bank directory is named by a fingerprint of the spec, the checkpoint, the weights' dtype, the
        bank format and (for methods that calibrate) the few-shot set and projector version; a method
        that needs no statistics (magnitude) keeps one bank across projector updates.
        """
        return open_or_build(self.model, self.fewshot_batches, self.bank_spec(space), banks_dir,
                             source=str(self.loaded.path),
                             calibration=f"{self.task.fingerprint}/projector-{projector_version}", log=log)

    def scorer(self, space: SearchSpace, bank: VariantBank, srm: SRMConfig,
               fidelity: str = DEFAULT_FIDELITY) -> PolicyScorer:
        """A PolicyScorer on the few-shot batches (fails fast when the budget band is unreachable)."""
        cost = self.cost_model(space.granularity)
        check_band(space, space.unit_names(self.num_layers), cost.unit_param_counts())
        return PolicyScorer(self.model, self.fewshot_batches, bank, space.budget, srm, cost, fidelity)


def open_pipeline(model: ModelConfig, data: DataConfig, batch_size: int = 32) -> Pipeline:
    """Load the model and the task, and encode the few-shot set on the model's device."""
    task = load_task(data)  # first: bad data fails before minutes of model loading
    if task.kind != MULTIPLE_CHOICE:  # until open-ended / label-free fidelity is wired into the scorer
        raise DataError(f"data: {task.source} is an {task.kind.replace('_', '-')} task; the search and `evaluate` score "
                        "multiple-choice tasks only so far (data.kind: multiple_choice needs options and answers)")
    loaded = load_model(model.spec, dtype=model.dtype, device=model.device)
    batches = encode_batches(loaded.processor, task.fewshot, batch_size, loaded.prompt_format, loaded.device,
                             loaded.dtype, family=loaded.family)
    return Pipeline(loaded, task, batch_size, batches)
