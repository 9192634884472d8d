"""The attribution-guided sampler and what it reads: per-unit KL shares from one backward pass, the budget DP."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

from efficientllava.budget_dp import least_cost_indices
from efficientllava.data.synthetic import make_synthetic
from efficientllava.errors import ConfigError, PolicyError
from efficientllava.models.loading import load_model
from efficientllava.policy import PruningPolicy
from efficientllava.prompting import COMPACT, encode_batches
from efficientllava.pruning.bank import BankSpec, build_bank
from efficientllava.pruning.materialize import Materializer
from efficientllava.scoring.attribution import kl_attributions
from efficientllava.scoring.cost import CostModel
from efficientllava.scoring.fidelity import dense_reference, evaluate_fidelity
from efficientllava.scoring.objective import PolicyScorer
from efficientllava.scoring.srm import SRMConfig
from efficientllava.search.api import ATTRIBUTION_ATTR, Param, Space, SpaceBudget
from efficientllava.search.samplers.evolution import BudgetEvolutionSampler
from efficientllava.search.samplers.guided import GuidedSampler
from efficientllava.space import Budget

UNITS = [f"layer.{i}" for i in range(6)]
LEVELS = (0.0, 0.3, 0.6, 0.9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The trained tiny model, 16 few-shot samples and a magnitude bank at layer granularity."""
    model = load_model("tiny", device="cpu").model
    processor = load_model("tiny", device="cpu").processor
    batches = encode_batches(processor, make_synthetic(16, 3, "train"), 8, COMPACT)
    spec = BankSpec("layer", tuple((u, LEVELS) for u in UNITS), "magnitude", "unstructured")
    bank = build_bank(model, batches, spec, tmp_path_factory.mktemp("bank") / "bank")
    return model, batches, bank


def _kl_at(model, batches, reference, weights, name, value) -> float:
    with torch.no_grad():
        weights[name].copy_(value)
    return evaluate_fidelity(model, batches, reference).kl


def test_a_units_share_is_half_the_kls_slope_along_its_pruning_delta(tiny) -> None:
    model, batches, bank = tiny
    mat = Materializer(model, bank)
    reference = dense_reference(model, batches)
    policy = PruningPolicy.from_mapping({u: (0.6 if i % 2 else 0.9) for i, u in enumerate(UNITS)})
    before = [p.requires_grad for p in model.parameters()]
    with mat.applied(policy):
        shares, fid = kl_attributions(model, batches, reference, mat.weights, mat.dense, bank.unit_linears)
        kl = evaluate_fidelity(model, batches, reference).kl
        assert fid.kl == pytest.approx(kl, rel=1e-5) and fid.accuracy == evaluate_fidelity(model, batches, reference).accuracy
        assert [p.requires_grad for p in model.parameters()] == before
        assert all(p.grad is None for p in model.parameters())
        # Independently: a central difference of the KL along one linear's delta, at the pruned point.
        name = bank.unit_linears["layer.2"][0]
        pruned = mat.weights[name].detach().clone()
        delta = pruned - mat.dense[name]
        eps = 1e-2
        plus = _kl_at(model, batches, reference, mat.weights, name, pruned + eps * delta)
        minus = _kl_at(model, batches, reference, mat.weights, name, pruned - eps * delta)
        _kl_at(model, batches, reference, mat.weights, name, pruned)
        only = {**{n: mat.weights[n] for n in bank.unit_linears["layer.2"]}}
        one, _ = kl_attributions(model, batches, reference, only, mat.dense, {"layer.2": (name,)})
    assert one["layer.2"] == pytest.approx(0.5 * (plus - minus) / (2 * eps), rel=0.02)
    assert set(shares) == set(UNITS) and all(math.isfinite(v) for v in shares.values()) and kl > 0
    # Near the dense model the KL is quadratic, so the shares add up to it.
    mild = PruningPolicy.uniform(UNITS, 0.3)
    with mat.applied(mild):
        small, _ = kl_attributions(model, batches, reference, mat.weights, mat.dense, bank.unit_linears)
        kl = evaluate_fidelity(model, batches, reference).kl
    assert sum(small.values()) == pytest.approx(kl, rel=0.3)


def test_the_dense_model_has_no_share_and_the_scorer_records_them(tiny) -> None:
    model, batches, bank = tiny
    mat = Materializer(model, bank)
    reference = dense_reference(model, batches)
    shares, _ = kl_attributions(model, batches, reference, mat.weights, mat.dense, bank.unit_linears)
    assert set(shares.values()) == {0.0}
    cost = CostModel.from_model(model, "layer", 20)
    scorer = PolicyScorer(model, batches, bank, Budget(0.6, 0.01), SRMConfig(), cost)
    policy = PruningPolicy.uniform(UNITS, 0.6)
    plain, split = scorer.score(policy), scorer.score(policy, attribution=True)
    assert plain.attribution == () and [u for u, _ in split.attribution] == UNITS
    assert split.kl == plain.kl and "attribution" not in split.as_dict()
    assert sum(v for _, v in split.attribution) > 0  # a unit's share may be negative; their sum is not


# -- the sampler, on an additive objective whose true sensitivities it must find -------------------------
LV = tuple(round(0.7 + 0.02 * i, 2) for i in range(15))
CURVE = tuple((lv - 0.68) ** 3 for lv in LV)  # every unit's own error, rising with the level
SENS = tuple(10 ** (i / 4 - 1.5) for i in range(12))  # how much each unit's error costs: 0.03 .. 18
WEIGHTS = tuple(1.0 if i % 3 else 2.0 for i in range(12))
SPACE = Space(tuple(Param(f"u{i}", 0, 14, LV, WEIGHTS[i], errors=CURVE) for i in range(12)), SpaceBudget(0.9, 0.002))


def _loss(idx: list[int]) -> float:
    return math.fsum(s * CURVE[k] for s, k in zip(SENS, idx, strict=True))


def _objective(trial: optuna.Trial, attribution: bool = True) -> float:
    idx = [trial.suggest_int(f"u{i}", 0, 14) for i in range(12)]
    if attribution:
        trial.set_user_attr(ATTRIBUTION_ATTR, {f"u{i}": SENS[i] * CURVE[k] for i, k in enumerate(idx)})
    return -_loss(idx)


def _in_band(params: dict[str, int]) -> bool:
    mean = math.fsum(w * LV[params[f"u{i}"]] for i, w in enumerate(WEIGHTS)) / math.fsum(WEIGHTS)
    return 0.898 - 1e-9 <= mean <= 0.902 + 1e-9


def test_it_finds_the_true_optimum_in_a_few_trials_where_evolution_does_not() -> None:
    optimum = least_cost_indices([LV] * 12, WEIGHTS, [[s * e for e in CURVE] for s in SENS], 0.898, 0.902)
    guided = optuna.create_study(direction="maximize", sampler=GuidedSampler(SPACE, 0))
    guided.optimize(_objective, n_trials=12)
    evolution = optuna.create_study(direction="maximize", sampler=BudgetEvolutionSampler(SPACE, 0))
    evolution.optimize(_objective, n_trials=12)
    assert all(_in_band(t.params) for t in guided.trials)
    assert guided.best_value == pytest.approx(-_loss(optimum), rel=1e-6)
    assert evolution.best_value < guided.best_value - 0.05 * abs(guided.best_value)


def test_without_attributions_it_is_the_evolution() -> None:
    runs = []
    for sampler in (GuidedSampler(SPACE, 5), BudgetEvolutionSampler(SPACE, 5)):
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(lambda t: _objective(t, attribution=False), n_trials=10)
        runs.append([t.params for t in study.trials])
    assert runs[0] == runs[1]


def test_deterministic_and_a_repeat_is_redrawn() -> None:
    runs = []
    for _ in range(2):
        study = optuna.create_study(direction="maximize", sampler=GuidedSampler(SPACE, 3))
        study.optimize(_objective, n_trials=15)
        runs.append([tuple(t.params.values()) for t in study.trials])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == len(runs[0])  # once the optimum is found, later trials are new points near it


def test_bad_settings_and_curves_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="radius"):
        GuidedSampler(SPACE, 0, radius=0)
    with pytest.raises(ConfigError, match="noise"):
        GuidedSampler(SPACE, 0, noise=-1)
    with pytest.raises(ValueError, match="errors need one finite value"):
        Param("u", 0, 2, (0.1, 0.2, 0.3), errors=(0.0, 1.0))
    with pytest.raises(ValueError, match="errors need one finite value"):
        Param("u", 0, 1, (0.1, 0.2), errors=(0.0, math.nan))


def test_budget_dp_respects_forbidden_levels_and_says_when_the_band_is_out_of_reach() -> None:
    levels = [(0.5, 0.7, 0.9)] * 3
    costs = [[0.0, 1.0, 4.0], [0.0, 1.0, 1.5], [0.0, 5.0, 6.0]]
    assert least_cost_indices(levels, [1.0] * 3, costs, 0.765, 0.77) == [2, 2, 0]  # mean 0.7667: 4 steps up, 5.5
    costs[1][2] = math.inf  # forbidden: the next best way up, 1 + 1 + 6
    assert least_cost_indices(levels, [1.0] * 3, costs, 0.765, 0.77) == [1, 1, 2]
    with pytest.raises(PolicyError, match="budget band"):
        least_cost_indices(levels, [1.0] * 3, [[0.0, math.inf, math.inf]] * 3, 0.8, 0.81)


def test_fp16_shares_match_fp32_ones(tiny, tmp_path) -> None:
    """A KL of 1e-6 has gradients below fp16's range; the loss is scaled so a half-precision model (a 7B on a
    GPU) measures the same shares."""
    import copy

    model, batches, _ = tiny
    spec = BankSpec("layer", tuple((u, (0.0, 0.3)) for u in UNITS), "magnitude", "unstructured")
    out = {}
    for dtype in (torch.float32, torch.float16):
        m = copy.deepcopy(model).to(dtype)
        bank = build_bank(m, batches, spec, tmp_path / str(dtype))
        mat = Materializer(m, bank)
        reference = dense_reference(m, batches)
        with mat.applied(PruningPolicy.uniform(UNITS, 0.3)):
            out[dtype] = kl_attributions(m, batches, reference, mat.weights, mat.dense, bank.unit_linears)[0]
    top = max(UNITS, key=lambda u: abs(out[torch.float32][u]))
    assert out[torch.float16][top] == pytest.approx(out[torch.float32][top], rel=0.05)
    assert all(math.isfinite(v) for v in out[torch.float16].values())
