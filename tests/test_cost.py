"""Tests of the cost model on a tiny random LLaVA."""

from __future__ import annotations

import pytest
import torch
from helpers import random_llava

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.units import linear_modules, prunable_units
from efficientllava.scoring.cost import (
    SEMI_STRUCTURED_CPU_MESSAGE,
    CostModel,
    measure_latency,
    semi_structured_support,
)

TOKENS = 12


@pytest.fixture(scope="module")
def model():
    return random_llava()


@pytest.fixture(scope="module", params=["layer", "sublayer"])
def cost_model(request, model) -> CostModel:
    return CostModel.from_model(model, request.param, tokens_per_sample=TOKENS)


def test_param_counts_match_numel(model, cost_model: CostModel) -> None:
    units = prunable_units(model, "sublayer" if cost_model.unit_names[0].endswith(".attn") else "layer")
    expected = {u.name: sum(m.weight.numel() for m in linear_modules(model, u).values()) for u in units}
    assert cost_model.unit_param_counts() == expected
    llm = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".layers." in n and "language_model" in n and "proj" in n
    )
    assert cost_model.llm_params == llm == 2 * (4 * 32 * 32 + 3 * 64 * 32)
    assert cost_model.total_params == sum(p.numel() for p in model.parameters())
    assert cost_model.lm_head_params == 64 * 32
    assert cost_model.projector_params == 2 * 32 * 32
    assert (cost_model.vision_tokens, cost_model.image_tokens) == (5, 4)  # CLS dropped for the LLM


def test_uniform_half_keeps_half(cost_model: CostModel) -> None:
    cost = cost_model.cost(PruningPolicy.uniform(cost_model.unit_names, 0.5))
    assert cost.kept_fraction == 0.5
    assert cost.llm_params_kept == cost.llm_params // 2
    assert cost.total_params_kept == cost.total_params - cost.llm_params // 2


def test_dense_policy_has_no_speedup(cost_model: CostModel) -> None:
    cost = cost_model.cost(PruningPolicy.uniform(cost_model.unit_names, 0.0))
    assert cost.flops_speedup == 1.0
    assert cost.flops_per_sample == cost.dense_flops_per_sample
    assert cost.kept_fraction == 1.0 and cost.total_params_kept == cost.total_params


def test_flops_fall_monotonically_with_sparsity(cost_model: CostModel) -> None:
    costs = [cost_model.cost(PruningPolicy.uniform(cost_model.unit_names, lv)) for lv in (0.0, 0.2, 0.5, 0.8)]
    flops = [c.flops_per_sample for c in costs]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4
    speedups = [c.flops_speedup for c in costs]
    assert speedups == sorted(speedups) and speedups[-1] > 1.0
    # Only the LLM linears change: the drop is exactly 2 * pruned weights * tokens.
    assert flops[0] - flops[2] == pytest.approx(2 * 0.5 * cost_model.llm_params * TOKENS)


def test_dense_flops_formula(cost_model: CostModel) -> None:
    t = TOKENS
    expected = (
        2 * (cost_model.llm_params + 64 * 32) * t  # LLM linears + lm_head
        + 4 * t * t * 32 * 2  # attention, 2 layers
        + 2 * 2 * 32 * 32 * 4  # projector on 4 image tokens
        + 2 * cost_model.vision_params * 5
        + 4 * 5 * 5 * 32 * 1  # vision tower
    )
    dense = cost_model.cost(PruningPolicy.uniform(cost_model.unit_names, 0.0)).dense_flops_per_sample
    assert dense == expected


def test_policy_must_match_units(cost_model: CostModel) -> None:
    with pytest.raises(PolicyError, match="layer.7"):
        cost_model.cost(PruningPolicy.uniform([*cost_model.unit_names, "layer.7"], 0.5))
    with pytest.raises(ConfigError, match="tokens_per_sample"):
        CostModel(**{**cost_model.__dict__, "tokens_per_sample": 0})


def test_measure_latency(model) -> None:
    batch = {
        "input_ids": torch.tensor([[1, 3, 3, 3, 3, 5, 6]] * 2),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
        "pixel_values": torch.randn(2, 3, 16, 16),
        "labels": torch.zeros(2, dtype=torch.long),  # not a forward argument: must be left out
    }
    seconds = measure_latency(model, [batch], repeats=2, warmup=1)
    assert 0 < seconds < 5
    with pytest.raises(ConfigError):
        measure_latency(model, [], repeats=1)
    with pytest.raises(ConfigError):
        measure_latency(model, [batch], repeats=0)


def test_semi_structured_support_on_cpu() -> None:
    ok, why = semi_structured_support("cpu")
    assert ok is False and why == SEMI_STRUCTURED_CPU_MESSAGE
    if not torch.cuda.is_available():
        assert semi_structured_support("cuda") == (False, SEMI_STRUCTURED_CPU_MESSAGE)
