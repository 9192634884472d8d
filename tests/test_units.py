"""Unit names at every granularity (layer / sublayer / matrix) and matrix granularity through bank, cost, space,
evolution, evaluate and the report."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch

from efficientllava.errors import ConfigError
from efficientllava.evaluate import policy_space
from efficientllava.evolution import describe_evolution, evolve_space
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.bank import BankSpec, build_bank
from efficientllava.pruning.materialize import Materializer
from efficientllava.pruning.units import (
    GRANULARITIES,
    granularity_of,
    is_unit,
    parse_unit,
    prunable_units,
    sort_units,
    unit_granularity,
    unit_names,
    unit_sort_key,
)
from efficientllava.report import sparsity_figure
from efficientllava.scoring.cost import CostModel
from efficientllava.space import Budget, SearchSpace, load_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


def test_unit_names_per_granularity():
    assert GRANULARITIES == ("layer", "sublayer", "matrix")
    assert unit_names(2, "layer") == ["layer.0", "layer.1"]
    assert unit_names(2, "sublayer") == ["layer.0.attn", "layer.0.mlp", "layer.1.attn", "layer.1.mlp"]
    assert unit_names(2, "matrix") == [f"layer.{i}.{m}" for i in range(2) for m in MATRICES]
    with pytest.raises(ConfigError, match="granularity 'block' is not one of layer, sublayer, matrix"):
        unit_names(2, "block")


def test_parse_and_granularity_of_unit_names():
    assert parse_unit("layer.12") == (12, "all")
    assert parse_unit("layer.3.attn") == (3, "attn")
    assert parse_unit("layer.31.gate") == (31, "gate")
    for bad in ("layer.3.gat", "layer", "layer.x", "layers.3", "layer.3.q.k", "other"):
        assert not is_unit(bad)
        with pytest.raises(ConfigError, match="not a unit name"):
            parse_unit(bad)
    assert [unit_granularity(u) for u in ("layer.0", "layer.0.mlp", "layer.0.down")] == list(GRANULARITIES)
    assert granularity_of(unit_names(3, "matrix")) == "matrix"
    with pytest.raises(ConfigError, match="one granularity"):
        granularity_of(["layer.0.q", "layer.0.mlp"])


def test_model_order():
    shuffled = ["layer.10.q", "other", "layer.2.down", "layer.2.q", "layer.2.up", "layer.2.k", "layer.2.gate",
                "layer.2.o", "layer.2.v", "layer.1.down"]
    assert sort_units(shuffled) == ["layer.1.down", "layer.2.q", "layer.2.k", "layer.2.v", "layer.2.o",
                                    "layer.2.gate", "layer.2.up", "layer.2.down", "layer.10.q", "other"]
    for g in GRANULARITIES:
        names = unit_names(12, g)
        assert sort_units(reversed(names)) == names
    # attention before MLP at every granularity: layer < attn < q..o < mlp < gate..down within a layer
    keys = [unit_sort_key(f"layer.4.{p}") for p in ("attn", *MATRICES[:4], "mlp", *MATRICES[4:])]
    assert keys == sorted(keys) and unit_sort_key("layer.4") < keys[0] < unit_sort_key("layer.5")


def test_matrix_units_of_a_model(small_model):
    model = small_model[0]
    units = prunable_units(model, "matrix")
    assert [u.name for u in units] == unit_names(2, "matrix")
    by_name = {u.name: u for u in units}
    assert by_name["layer.1.k"].linears == ("model.language_model.layers.1.self_attn.k_proj",)
    assert by_name["layer.0.down"].linears == ("model.language_model.layers.0.mlp.down_proj",)
    sub = {u.name: set(u.linears) for u in prunable_units(model, "sublayer")}
    assert sub["layer.0.attn"] == {n for m in "qkvo" for n in by_name[f"layer.0.{m}"].linears}


def test_tiny_matrix_space_is_the_tiny_space_per_matrix():
    tiny, matrix = load_space(SPACES / "tiny.yaml"), load_space(SPACES / "tiny-matrix.yaml")
    assert matrix.granularity == "matrix" and matrix.name == "tiny-matrix"
    assert (matrix.levels, matrix.budget, matrix.method, matrix.pattern) == \
           (tiny.levels, tiny.budget, tiny.method, tiny.pattern)
    assert len(matrix.unit_names(6)) == 42


def test_space_unit_levels_at_matrix_granularity():
    space = SearchSpace(granularity="matrix", levels=(0.0, 0.5), budget=Budget(target=0.3),
                        unit_levels={"layer.1.up": (0.5,), "layer.0.q": (0.0, 0.5), "layer.1.k": (0.5,)})
    assert [u for u, _ in space.unit_levels] == ["layer.0.q", "layer.1.k", "layer.1.up"]
    with pytest.raises(ConfigError, match="not a matrix-granularity unit like layer.3.q / layer.3.k"):
        SearchSpace(granularity="matrix", levels=(0.0,), budget=Budget(target=0.3), unit_levels={"layer.0.attn": (0.0,)})
    with pytest.raises(ConfigError, match="not a sublayer-granularity unit like layer.3.attn / layer.3.mlp"):
        SearchSpace(granularity="sublayer", levels=(0.0,), budget=Budget(target=0.3), unit_levels={"layer.0.q": (0.0,)})


def test_bank_materializes_each_matrix_at_its_own_level(small_model, small_batches, tmp_path):
    model = copy.deepcopy(small_model[0])
    names = unit_names(2, "matrix")
    levels = (0.0, 0.25, 0.5, 0.75)
    bank = build_bank(model, small_batches, BankSpec("matrix", tuple((u, levels) for u in names), "sparsegpt",
                                                     "unstructured"), tmp_path / "bank")
    assert sorted(bank.unit_linears) == sorted(names) and all(len(v) == 1 for v in bank.unit_linears.values())
    policy = PruningPolicy(tuple((u, levels[i % 4]) for i, u in enumerate(names)))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with Materializer(model, bank).applied(policy):
        for unit in prunable_units(model, "matrix"):
            (name,) = unit.linears
            weight = model.get_submodule(name).weight
            got = float((weight == 0).float().mean())
            assert abs(got - policy.ratio(unit.name)) <= 1.0 / weight.shape[1] + 1e-6, (unit.name, got)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())


def test_cost_per_matrix(small_model):
    model = small_model[0]
    matrix = CostModel.from_model(model, "matrix", tokens_per_sample=10)
    sub = CostModel.from_model(model, "sublayer", tokens_per_sample=10)
    counts = matrix.unit_param_counts()
    assert counts == {u.name: model.get_submodule(u.linears[0]).weight.numel()
                      for u in prunable_units(model, "matrix")}
    assert sum(counts[f"layer.1.{m}"] for m in "qkvo") == sub.unit_param_counts()["layer.1.attn"]
    assert matrix.llm_params == sub.llm_params
    assert matrix.unit_flops() == {u: 2.0 * n * 10 for u, n in counts.items()}
    # pruning only layer.0.down by half removes exactly half its FLOPs
    policy = PruningPolicy(tuple((u, 0.5 if u == "layer.0.down" else 0.0) for u in matrix.unit_names))
    cost = matrix.cost(policy)
    assert cost.dense_flops_per_sample - cost.flops_per_sample == pytest.approx(0.5 * matrix.unit_flops()["layer.0.down"])
    assert cost.kept_fraction == pytest.approx(1 - 0.5 * counts["layer.0.down"] / matrix.llm_params)


def test_evaluate_policy_space_knows_the_granularity():
    for g in GRANULARITIES:
        policy = PruningPolicy.uniform(unit_names(2, g), 0.5)
        space = policy_space(policy, "magnitude", "unstructured")
        assert space.granularity == g and space.unit_names(2) == unit_names(2, g)


def test_evolution_at_matrix_granularity():
    names = unit_names(2, "matrix")
    space = SearchSpace(granularity="matrix", levels=(0.0, 0.25, 0.5, 0.75), budget=Budget(target=0.3))
    top = [PruningPolicy(tuple((u, 0.5) for u in names))]
    evolved = evolve_space(space, top, 0, {u: 1 for u in names})
    assert all(evolved.levels_for(u) == (0.5,) for u in names)
    lines = describe_evolution(space, evolved).splitlines()
    assert [line.split(":")[0] for line in lines] == names  # model order


def test_sparsity_chart_readable_at_224_matrices():
    """A 7B model at matrix granularity (32 layers x 7): grouped by layer, one tick per layer, a legend of matrices."""
    names = unit_names(32, "matrix")
    best = pd.Series({"round": 1, "number": 3, **{f"policy/{u}": (i % 7) / 10 for i, u in enumerate(names)}})
    fig = sparsity_figure(best)
    ax = fig.axes[0]
    bars = ax.patches
    assert len(bars) == 224
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(32)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(MATRICES)
    # one colour per matrix; a gap between layers: layer 1's q bar starts 8 slots after layer 0's
    heights = {round(b.get_x() + b.get_width() / 2): b.get_height() for b in bars}
    assert heights[0] == 0.0 and heights[6] == pytest.approx(0.6) and 7 not in heights and heights[8] == 0.0
    width, height = fig.get_size_inches()
    assert 10 < width <= 24 and height < 5  # wide enough for 224 bars, still one screen-sized figure


def test_sparsity_chart_layer_and_sublayer():
    layer = sparsity_figure(pd.Series({"round": 0, "number": 0, **{f"policy/layer.{i}": 0.5 for i in range(6)}}))
    assert [t.get_text() for t in layer.axes[0].get_xticklabels()] == [f"layer.{i}" for i in range(6)]
    sub = sparsity_figure(pd.Series({"round": 0, "number": 0,
                                     **{f"policy/{u}": 0.5 for u in unit_names(6, "sublayer")}}))
    assert [t.get_text() for t in sub.axes[0].get_legend().get_texts()] == ["attn", "mlp"]
    assert len(sub.axes[0].patches) == 12
