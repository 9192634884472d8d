"""Variant bank + materialisation: per-unit sparsity, bit-exact restore, policy errors."""

from __future__ import annotations

import copy

import pytest
import torch

from efficientllava.errors import PolicyError
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.bank import BankSpec, bank_bytes, build_bank, open_bank
from efficientllava.pruning.materialize import Materializer
from efficientllava.pruning.methods import method_names
from efficientllava.pruning.units import prunable_units
from efficientllava.scoring.accuracy import evaluate_accuracy

LEVELS = (0.0, 0.3, 0.5)


def _spec(method: str, granularity: str = "layer", pattern: str = "unstructured", levels=LEVELS) -> BankSpec:
    units = ["layer.0", "layer.1"] if granularity == "layer" else [
        "layer.0.attn", "layer.0.mlp", "layer.1.attn", "layer.1.mlp"]
    return BankSpec(granularity, tuple((u, levels) for u in units), method, pattern)


@pytest.fixture()
def model(small_model):
    return copy.deepcopy(small_model[0])


def _zeros(w: torch.Tensor) -> float:
    return float((w == 0).float().mean())


def _dense(model, bank, unit: str) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in bank.unit_linears[unit]}


@pytest.mark.parametrize("method", method_names())
def test_policy_sparsity_per_unit(model, small_batches, tmp_path, method):
    bank = build_bank(model, small_batches, _spec(method, "sublayer"), tmp_path / "bank")
    mat = Materializer(model, bank)
    policy = PruningPolicy.from_mapping({"layer.0.attn": 0.5, "layer.0.mlp": 0.3, "layer.1.attn": 0.0,
                                         "layer.1.mlp": 0.5})
    mat.apply(policy)
    for unit in prunable_units(model, "sublayer"):
        want = policy.ratio(unit.name)
        for name in unit.linears:
            got = _zeros(model.get_submodule(name).weight)
            assert abs(got - want) <= 1.0 / model.get_submodule(name).in_features + 1e-6, (name, got, want)
    mat.restore()


def test_nm_pattern_from_bank(model, small_batches, tmp_path):
    bank = build_bank(model, small_batches, _spec("sparsegpt", pattern="2:4", levels=(0.0, 0.5)), tmp_path / "b")
    mat = Materializer(model, bank)
    with mat.applied(PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.5})):
        for unit in prunable_units(model, "layer"):
            for name in unit.linears:
                groups = model.get_submodule(name).weight.reshape(-1, 4)
                assert ((groups == 0).sum(1) >= 2).all(), name


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])  # compact and nested-mask formats
def test_restore_is_bit_exact_and_incremental(model, small_batches, tmp_path, method):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = build_bank(model, small_batches, _spec(method), tmp_path / "bank")
    mat = Materializer(model, bank)
    dense_acc = evaluate_accuracy(model, small_batches).correct
    a = PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.3})
    b = PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.0})
    mat.apply(a)
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    mat.apply(b)  # only layer.1 changes
    mat.apply(a)
    assert all(torch.equal(pruned[k], v) for k, v in model.state_dict().items())
    mat.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert evaluate_accuracy(model, small_batches).correct == dense_acc


def test_bank_reopens_with_norms(model, small_batches, tmp_path):
    built = build_bank(model, small_batches, _spec("wanda"), tmp_path / "bank")
    bank = open_bank(tmp_path / "bank")
    assert bank.fingerprint == built.fingerprint
    assert bank_bytes(tmp_path / "bank") > 0
    name = next(iter(bank.unit_linears["layer.0"]))
    assert bank.norm(name, 0.5) < bank.norm(name, 0.3) < bank.norm(name, 0.0)
    mask = bank.variant("layer.0", 0.5, _dense(model, bank, "layer.0"))[name] != 0
    dense = model.get_submodule(name).weight.detach()
    assert float((dense * mask).norm()) == pytest.approx(bank.norm(name, 0.5), rel=1e-5)


def test_sparsegpt_norms_are_of_the_masked_dense_weights(model, small_batches, tmp_path):
    """SparseGPT's update inflates kept weights; the SRM capacity must still fall with sparsity."""
    bank = build_bank(model, small_batches, _spec("sparsegpt"), tmp_path / "bank", eager=True)
    for name in bank.unit_linears["layer.1"]:
        assert bank.norm(name, 0.5) < bank.norm(name, 0.3) < bank.norm(name, 0.0)


def test_bad_policies_raise(model, small_batches, tmp_path):
    bank = build_bank(model, small_batches, _spec("magnitude"), tmp_path / "bank")
    mat = Materializer(model, bank)
    with pytest.raises(PolicyError, match="layer.0: ratio 0.4 is not a level"):
        mat.apply(PruningPolicy.from_mapping({"layer.0": 0.4, "layer.1": 0.0}))
    with pytest.raises(PolicyError, match="layer.7"):
        mat.apply(PruningPolicy.from_mapping({"layer.7": 0.3}))
    with pytest.raises(PolicyError):
        PruningPolicy.from_mapping({"layer.0": 1.0})
    with pytest.raises(Exception, match="not a complete variant bank"):
        open_bank(tmp_path / "nothing-here")


def test_preload_only_when_the_bank_fits(model, small_batches, tmp_path):
    bank = build_bank(model, small_batches, _spec("magnitude"), tmp_path / "bank")
    assert not bank.preload("cpu", max_bytes=1)  # too big: read per swap, nothing kept
    bank.variant("layer.0", 0.5, _dense(model, bank, "layer.0"))
    assert not bank._cache
    assert bank.preload("cpu")
    assert len(bank._cache) == 2  # one level index per unit holds both non-zero levels
    bank = build_bank(model, small_batches, _spec("sparsegpt"), tmp_path / "compact", eager=True)
    assert not bank.preload("cpu", max_bytes=1)
    bank.variant("layer.0", 0.5, _dense(model, bank, "layer.0"))
    assert not bank._cache
    assert bank.preload("cpu")
    assert len(bank._cache) == 4  # 2 units x 2 non-zero levels
