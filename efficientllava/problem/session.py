"""A worker's heavy state for the pruning problem: the model loaded once, a variant bank, a round's scorer.

One `WorkerSession` lives in each evaluation worker for the whole search. Entering a round swaps
in the round's projector and space (and, only when `projector.rebuild_bank`, a bank calibrated
with that projector); the model and the encoded few-shot set stay. Banks are caches on the
worker's node (`$EFFICIENTLLAVA_HOME/banks/<fingerprint>`, file-locked: workers on one node build
one copy), never in the experiment directory.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efficientllava.config import ExperimentConfig
from efficientllava.log import get_logger
from efficientllava.models.tiny import home_dir
from efficientllava.pipeline import Pipeline, open_pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.projector import projector_module, projector_state
from efficientllava.pruning.bank import VariantBank, bank_bytes
from efficientllava.scoring.objective import PolicyScorer
from efficientllava.scoring.srm import SRMConfig
from efficientllava.space import SearchSpace, check_band, fit_to_budget, space_from_dict

log = get_logger(__name__)
CHECKPOINT_PROJECTOR = 0  # the calibration tag of banks built with the checkpoint's own projector


def srm_config(cfg: ExperimentConfig) -> SRMConfig:
    """The SRM constants of an experiment."""
    o = cfg.objective
    return SRMConfig(lam=o.lam, delta=o.delta, scale=o.scale, aggregate=o.aggregate)


def resolved_space(space: SearchSpace, num_layers: int) -> SearchSpace:
    """`space` with every unit's levels written out (so each round's space file is self-contained)."""
    return space.with_unit_levels({u: space.levels_for(u) for u in space.unit_names(num_layers)})


def params_to_policy(params: Mapping[str, Any], space: SearchSpace, units: list[str]) -> PruningPolicy:
    """Sampled level indices -> the policy they name (before budget repair)."""
    return PruningPolicy(tuple((u, space.levels_for(u)[int(params[u])]) for u in units))


def bank_cache_dir() -> Path:
    """This node's bank cache: `$EFFICIENTLLAVA_HOME/banks`."""
    return Path(home_dir()) / "banks"


@dataclass(frozen=True)
class RoundInputs:
    """What a worker needs for one round (built on the driver, shipped through Ray's object store)."""

    round: int
    space: dict[str, Any]  # the round's SearchSpace.to_dict()
    bank_space: dict[str, Any]  # the space the bank is built for (round 0's unless rebuild_bank)
    projector: dict[str, torch.Tensor] | None  # the round's projector weights; None = the checkpoint's
    projector_version: int
    bank_tag: int  # calibration tag of the bank: CHECKPOINT_PROJECTOR, or a 48-bit hash of the projector
    projector_hash: str | None = None  # content hash of `projector` (None for the checkpoint's)

    @property
    def key(self) -> tuple[Any, ...]:
        """What identifies the round's inputs (tensors compared by their hash)."""
        return (self.round, self.projector_version, self.projector_hash, self.bank_tag,
                repr(sorted(self.space.items())), repr(sorted(self.bank_space.items())))


class WorkerSession:
    """The model (loaded once), its banks, and the current round's space and scorer."""

    loads = 0  # model loads in this process (a search loads the model once per worker)

    def __init__(self, cfg: ExperimentConfig) -> None:
        t0 = time.perf_counter()
        self.cfg = cfg
        self.pipeline: Pipeline = open_pipeline(cfg.model, cfg.data, cfg.eval.batch_size,
                                                fidelity=cfg.objective.fidelity,
                                                max_new_tokens=cfg.eval.max_new_tokens)
        WorkerSession.loads += 1
        self.load_s = time.perf_counter() - t0
        self.checkpoint_projector = projector_state(self.pipeline.model)
        self.bank: VariantBank | None = None
        self.bank_key: tuple[str, int] | None = None
        self.scorer: PolicyScorer | None = None
        self.space: SearchSpace | None = None
        self.units: list[str] = []
        self.inputs: RoundInputs | None = None
        self._projector_batches: list[dict[str, torch.Tensor]] | None = None
        log.debug(f"model {cfg.model.spec} loaded in {self.load_s:.1f}s")

    @property
    def model(self) -> torch.nn.Module:
        """The live model."""
        return self.pipeline.model

    def set_projector(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Load projector weights into the model in place (None: the checkpoint's own)."""
        weights = self.checkpoint_projector if state is None else state
        target = projector_module(self.model).state_dict()
        with torch.no_grad():
            for key, tensor in target.items():
                tensor.copy_(weights[key])

    def enter(self, inputs: RoundInputs) -> None:
        """Make `inputs` the current round: its bank (built or opened once), projector, space and scorer."""
        if self.inputs is not None and self.inputs.key == inputs.key:
            self.set_projector(inputs.projector)  # a between-round call may have changed it
            return
        space, bank_space = space_from_dict(inputs.space), space_from_dict(inputs.bank_space)
        key = (repr(sorted(inputs.bank_space.items())), inputs.bank_tag)
        if key != self.bank_key:
            # Calibrate with the projector the bank is keyed by: the checkpoint's unless rebuild_bank.
            self.scorer, self.bank = None, None  # frees the old scorer's dense copy first
            self.set_projector(None if inputs.bank_tag == CHECKPOINT_PROJECTOR else inputs.projector)
            t0 = time.perf_counter()
            bank = self.pipeline.bank(bank_space, bank_cache_dir(), inputs.bank_tag, log=False)
            log.info(f"round {inputs.round}: variant bank {bank.fingerprint} ready in {time.perf_counter() - t0:.1f}s "
                     f"({bank_bytes(bank.root) / 2**20:.1f} MiB at {bank.root})")
            bank.preload(self.pipeline.loaded.device)  # when it fits: trials then copy device-to-device
            self.bank, self.bank_key = bank, key
        self.set_projector(inputs.projector)
        assert self.bank is not None
        if self.scorer is None:
            self.scorer = self.pipeline.scorer(space, self.bank, srm_config(self.cfg), self.cfg.objective.fidelity)
            # KL is always to the dense checkpoint (its own projector), so objectives compare across rounds and a
            # projector that brings pruned models closer to the original model scores better.
            self.set_projector(None)
            self.scorer.reference  # noqa: B018 (computes and caches the dense distributions)
            self.set_projector(inputs.projector)
        else:  # same bank and model: only the round's budget can differ
            check_band(space, space.unit_names(self.pipeline.num_layers), self.scorer.weights)
            self.scorer.budget = space.budget
        self.space, self.units, self.inputs = space, space.unit_names(self.pipeline.num_layers), inputs

    def policy(self, params: Mapping[str, Any]) -> tuple[PruningPolicy, PruningPolicy]:
        """(sampled policy, the policy actually scored): projected or repaired onto the budget as configured."""
        assert self.space is not None and self.scorer is not None
        raw = params_to_policy(params, self.space, self.units)
        return raw, fit_to_budget(raw, self.space, self.scorer.weights)

    def projector_batches(self) -> list[dict[str, torch.Tensor]]:
        """The few-shot set in batches of `projector.batch_size` (one backward pass each)."""
        if self.cfg.projector.batch_size == self.cfg.eval.batch_size:
            return self.pipeline.fewshot_batches
        if self._projector_batches is None:  # encoded while the model is dense (unlabelled: dense targets)
            self._projector_batches = self.pipeline.encode_split("fewshot", self.cfg.projector.batch_size)
        return self._projector_batches
