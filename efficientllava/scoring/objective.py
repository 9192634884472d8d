"""The policy objective: a few-shot fidelity signal minus the SRM generalisation-gap penalty, at the budget.

objective = fidelity value - lam * SRM gap (- a shortfall penalty when over_budget is "penalize"),
where the fidelity value is the few-shot accuracy, the mean log-likelihood of the right answer, or
minus the KL divergence of the pruned from the dense model (`objective.fidelity`, see
`scoring.fidelity`). Every signal is recorded in every trial, whichever one the objective uses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from efficientllava.policy import PruningPolicy
from efficientllava.pruning.bank import VariantBank
from efficientllava.pruning.materialize import Materializer
from efficientllava.scoring.attribution import kl_attributions
from efficientllava.scoring.cost import CostModel, measure_latency
from efficientllava.scoring.fidelity import DenseReference, check_fidelity, dense_reference, evaluate_fidelity
from efficientllava.scoring.srm import SRMConfig, capacity, generalization_gap, log_norm_ratios
from efficientllava.space import Budget

DEFAULT_FIDELITY = "kl"
REJECTED = -1e6  # objective of a rejected over-budget policy (below any fidelity - penalty: KL is unbounded)


@dataclass(frozen=True)
class TrialScore:
    """Every term of one policy's score, recorded separately per trial."""

    objective: float  # fidelity_value - lam * gap - budget penalty (what the search maximises)
    accuracy: float  # few-shot accuracy (NaN when rejected unevaluated)
    soft_accuracy: float  # mean probability of the right answer
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
    fidelity: str = DEFAULT_FIDELITY  # which signal the objective uses
    fidelity_value: float = math.nan  # that signal, higher is better (accuracy, loglik or -kl)
    loglik: float = math.nan  # mean log-likelihood of the right answer (nats)
    kl: float = math.nan  # mean KL(dense || pruned) of the answer distributions (nats)
    labelled: bool = True  # False: accuracy is agreement with the dense model's answers
    # Per-unit shares of the KL (`scoring.attribution`), when asked for: ((unit, share), ...).
    attribution: tuple[tuple[str, float], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Flat dict of the scalar terms (for tune.report and trial tables; `attribution` is left out)."""
        out = dataclasses.asdict(self)
        del out["attribution"]
        return out


class PolicyScorer:
    """Scores policies on one model + few-shot set: materialise from the bank, evaluate, restore.

    The dense model's answer distributions (for KL) are computed on first use of `reference` (at the
    latest the first `score`), before any policy is applied, and kept: the search computes them once with
    the checkpoint's projector, so KL is to the original model in every round.
    """

    def __init__(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], bank: VariantBank,
                 budget: Budget | None, srm: SRMConfig, cost_model: CostModel, fidelity: str = DEFAULT_FIDELITY):
        self.model = model
        self.batches = batches
        self.bank = bank
        self.budget = budget  # None: no budget (plain evaluation of a policy)
        self.srm = srm
        self.cost_model = cost_model
        self.fidelity = check_fidelity(fidelity)
        self.weights = cost_model.unit_param_counts()
        self.materializer = Materializer(model, bank)
        self.n_samples = sum(int(b["input_ids"].shape[0]) for b in batches)
        self._reference: DenseReference | None = None

    @property
    def reference(self) -> DenseReference:
        """The dense model's distributions on the few-shot batches (computed on first use)."""
        if self._reference is None:
            self.materializer.restore()  # the reference must come from the dense weights
            self._reference = dense_reference(self.model, self.batches)
        return self._reference

    def gap(self, policy: PruningPolicy) -> tuple[float, float]:
        """(capacity, SRM gap) of `policy`, from the bank's stored norms (no materialisation)."""
        self.materializer.prepare(policy)  # a lazily built bank knows a variant's norms once it exists
        logs = log_norm_ratios(policy, self.bank.pruned_norms, self.bank.dense_norms, self.bank.unit_linears)
        cap = capacity(logs, self.srm.aggregate)
        return cap, generalization_gap(cap, self.n_samples, self.srm.delta, self.srm.scale)

    def score(self, policy: PruningPolicy, latency: bool = False, attribution: bool = False) -> TrialScore:
        """Materialise `policy`, evaluate it on the few-shot batches, restore the dense model.

        With `attribution`, also split its KL per unit (one backward pass, `scoring.attribution`).
        """
        policy.validate(self.cost_model.unit_names)
        cost = self.cost_model.cost(policy)
        mean = policy.mean_sparsity(self.weights)
        budget = self.budget
        within = budget is None or budget.satisfied(mean)
        cap, gap = self.gap(policy)
        penalty = budget.shortfall_penalty(mean) if budget is not None and budget.over_budget == "penalize" else 0.0
        rejected = budget is not None and not within and budget.over_budget == "reject"
        nan = math.nan
        terms = {"accuracy": nan, "soft_accuracy": nan, "loglik": nan, "kl": nan, "fidelity_value": nan}
        eval_s, lat, labelled = 0.0, None, True
        shares: tuple[tuple[str, float], ...] = ()
        if rejected:  # not evaluated: scored below any evaluated policy, graded by how far it misses
            objective = REJECTED - (budget.floor - mean)  # type: ignore[union-attr]
        else:
            reference = self.reference
            with self.materializer.applied(policy):
                if attribution:  # the backward pass shares the scoring forward
                    split, result = kl_attributions(self.model, self.batches, reference, self.materializer.weights,
                                                    self.materializer.dense, self.bank.unit_linears)
                    shares = tuple((u, split[u]) for u, _ in policy.ratios if u in split)
                else:
                    result = evaluate_fidelity(self.model, self.batches, reference)
                lat = measure_latency(self.model, self.batches[:1]) if latency else None
            value = result.value(self.fidelity)
            terms = {"accuracy": result.accuracy, "soft_accuracy": result.soft_accuracy, "loglik": result.loglik,
                     "kl": result.kl, "fidelity_value": value}
            eval_s, labelled = result.seconds, result.labelled
            objective = value - self.srm.lam * gap - penalty
        return TrialScore(objective=objective, **terms, gap=gap, capacity=cap, lam=self.srm.lam,
                          mean_sparsity=mean, kept_fraction=cost.kept_fraction, within_budget=within,
                          budget_penalty=penalty, flops_per_sample=cost.flops_per_sample,
                          flops_speedup=cost.flops_speedup, n_samples=self.n_samples, eval_s=eval_s, latency_s=lat,
                          fidelity=self.fidelity, labelled=labelled, attribution=shares)
