"""The policy objective: few-shot accuracy minus the SRM generalisation-gap penalty, under a budget."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from efficientllava.policy import PruningPolicy
from efficientllava.pruning.bank import VariantBank
from efficientllava.pruning.materialize import Materializer
from efficientllava.scoring.accuracy import evaluate_accuracy
from efficientllava.scoring.cost import CostModel, measure_latency
from efficientllava.scoring.srm import SRMConfig, capacity, generalization_gap, log_norm_ratios
from efficientllava.space import Budget, budget_status

REJECTED = -1.0  # objective of a rejected over-budget policy (below any accuracy - penalty)


@dataclass(frozen=True)
class TrialScore:
    """Every term of one policy's score, recorded separately per trial."""

    objective: float  # accuracy - lam * gap - budget penalty (what the search maximises)
    accuracy: float  # few-shot accuracy (NaN when rejected unevaluated)
    soft_accuracy: float  # mean probability of the right option: a smoother few-shot signal, recorded only
    gap: float  # SRM generalisation-gap bound
    capacity: float  # rho(pi): pruned capacity relative to dense, in (0, 1]
    lam: float
    mean_sparsity: float  # parameter-weighted over the LLM's prunable linears
    kept_fraction: float
    within_budget: bool
    budget_penalty: float
    flops_per_sample: float
    flops_speedup: float
    n_samples: int
    eval_s: float
    latency_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Flat dict of the terms (for tune.report and trial tables)."""
        return dataclasses.asdict(self)


class PolicyScorer:
    """Scores policies on one model + few-shot set: materialise from the bank, evaluate, restore."""

    def __init__(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], bank: VariantBank,
                 budget: Budget | None, srm: SRMConfig, cost_model: CostModel):
        self.model = model
        self.batches = batches
        self.bank = bank
        self.budget = budget  # None: no budget (plain evaluation of a policy)
        self.srm = srm
        self.cost_model = cost_model
        self.weights = cost_model.unit_param_counts()
        self.materializer = Materializer(model, bank)
        self.n_samples = sum(len(b["answers"]) for b in batches)

    def gap(self, policy: PruningPolicy) -> tuple[float, float]:
        """(capacity, SRM gap) of `policy`, from the bank's stored norms (no materialisation)."""
        self.materializer.prepare(policy)  # a lazily built bank knows a variant's norms once it exists
        logs = log_norm_ratios(policy, self.bank.pruned_norms, self.bank.dense_norms, self.bank.unit_linears)
        cap = capacity(logs, self.srm.aggregate)
        return cap, generalization_gap(cap, self.n_samples, self.srm.delta, self.srm.scale)

    def score(self, policy: PruningPolicy, latency: bool = False) -> TrialScore:
        """Materialise `policy`, evaluate it on the few-shot batches, restore the dense model."""
        policy.validate(self.cost_model.unit_names)
        cost = self.cost_model.cost(policy)
        mean = policy.mean_sparsity(self.weights)
        budget = self.budget
        within = budget is None or budget_status(policy, budget, self.weights)[1]
        cap, gap = self.gap(policy)
        penalty = budget.shortfall_penalty(mean) if budget is not None and budget.over_budget == "penalize" else 0.0
        rejected = budget is not None and not within and budget.over_budget == "reject"
        if rejected:  # not evaluated: scored below any evaluated policy, graded by how far it misses
            accuracy, soft, eval_s, lat = math.nan, math.nan, 0.0, None
            objective = REJECTED - (budget.floor - mean)  # type: ignore[union-attr]
        else:
            with self.materializer.applied(policy):
                result = evaluate_accuracy(self.model, self.batches)
                lat = measure_latency(self.model, self.batches[:1]) if latency else None
            accuracy, soft, eval_s = result.accuracy, result.soft_accuracy, result.seconds
            objective = accuracy - self.srm.lam * gap - penalty
        return TrialScore(objective=objective, accuracy=accuracy, soft_accuracy=soft, gap=gap, capacity=cap, lam=self.srm.lam,
                          mean_sparsity=mean, kept_fraction=cost.kept_fraction, within_budget=within,
                          budget_penalty=penalty, flops_per_sample=cost.flops_per_sample,
                          flops_speedup=cost.flops_speedup, n_samples=self.n_samples, eval_s=eval_s, latency_s=lat)
