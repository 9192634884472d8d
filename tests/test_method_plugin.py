"""A pruning method defined and registered in this file alone is usable end to end (space, bank, scorer)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch

from efficientllava.errors import ConfigError
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.bank import BankSpec, CompactBank, NestedMaskBank, build_bank
from efficientllava.pruning.methods import (
    MethodOptions,
    NestedMethod,
    PruningMethod,
    get_method,
    method_names,
    register_method,
)
from efficientllava.pruning.patterns import Pattern
from efficientllava.scoring.cost import CostModel
from efficientllava.scoring.objective import PolicyScorer
from efficientllava.scoring.srm import SRMConfig
from efficientllava.space import Budget, SearchSpace, space_from_dict
from efficientllava.testing.pruning_methods import PruningMethodContract


@register_method
class LargestFirst(NestedMethod):
    """A deliberately bad nested method: prunes the largest weights first."""

    name = "test_largest_first"
    stats = "none"

    def saliency(self, weight, calib):
        return -weight.float().abs()


@dataclass(frozen=True)
class ShrinkOptions(MethodOptions):
    factor: float = 0.5

    def __post_init__(self):
        if not 0 < self.factor <= 1:
            raise ConfigError(f"factor {self.factor!r} must be in (0, 1]")


@register_method
class Shrink(PruningMethod):
    """A non-nested method with an option: Wanda's mask, kept weights scaled by `factor` (an 'update')."""

    name = "test_shrink"
    stats = "norms"
    scope = "row"
    options_type = ShrinkOptions

    def prune(self, weight, calib, sparsity, pattern):
        wanda = get_method("wanda")
        keep = wanda.level_index(weight, calib, (sparsity,), pattern) >= 1
        scaled = (weight.float() * self.options.factor).to(weight.dtype)
        return torch.where(keep, scaled, torch.zeros((), dtype=weight.dtype))


class TestLargestFirst(PruningMethodContract):
    @pytest.fixture
    def method(self):
        return get_method("test_largest_first")


class TestShrink(PruningMethodContract):
    @pytest.fixture
    def method(self):
        return get_method("test_shrink", {"factor": 0.25})


def test_registry_and_space_accept_the_plugin():
    assert {"test_largest_first", "test_shrink"} <= set(method_names())
    space = space_from_dict({"granularity": "layer", "levels": [0.0, 0.5], "budget": {"target": 0.25},
                             "method": {"name": "test_shrink", "factor": 0.75}})
    assert space.method == "test_shrink" and space.method_options == ShrinkOptions(0.75)
    assert space_from_dict(space.to_dict()) == space
    with pytest.raises(ConfigError, match="method.factor"):
        space_from_dict({"granularity": "layer", "levels": [0.0, 0.5], "budget": {"target": 0.25},
                         "method": {"name": "test_shrink", "factor": 2}})
    with pytest.raises(ValueError, match="already registered"):

        @register_method
        class Impostor(LargestFirst):
            name = "test_shrink"


@pytest.mark.parametrize(("name", "fmt"), [("test_largest_first", NestedMaskBank), ("test_shrink", CompactBank)])
def test_plugin_builds_a_bank_and_scores_a_policy(small_model, small_batches, tmp_path, name, fmt):
    model = copy.deepcopy(small_model[0])
    space = SearchSpace("layer", (0.0, 0.5), Budget(0.25), method=name)
    units = space.unit_names(2)
    spec = BankSpec(space.granularity, tuple((u, space.levels_for(u)) for u in units), space.method, space.pattern,
                    space.method_options)
    bank = build_bank(model, small_batches, spec, tmp_path / "bank")
    assert isinstance(bank, fmt)
    cost = CostModel.from_model(model, "layer", 20)
    scorer = PolicyScorer(model, small_batches, bank, space.budget, SRMConfig(), cost)
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in bank.unit_linears["layer.0"]}
    policy = PruningPolicy.from_mapping({"layer.0": 0.5, "layer.1": 0.0})
    score = scorer.score(policy)
    assert math.isfinite(score.objective) and 0.0 <= score.accuracy <= 1.0 and score.gap > 0
    method = get_method(name, space.method_options)
    want = {n: method.prune(w, bank_calib(model, small_batches, n, method), 0.5, Pattern()) for n, w in dense.items()}
    with scorer.materializer.applied(policy):
        for n in dense:
            assert torch.equal(model.get_submodule(n).weight.detach(), want[n]), n
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in dense.items())


def bank_calib(model, batches, name, method):
    from efficientllava.pruning.calibrate import collect_stats

    if method.stats == "none":
        return {}
    return method.prepare(collect_stats(model, batches, [name], need_hessian=method.stats == "hessian")[name])


def test_a_module_class_reference_reaches_workers_that_never_imported_the_method():
    """What a Ray worker does: read `method: module:Class` from the space file and import it."""
    ref = f"{__name__}:LargestFirst"
    space = space_from_dict({"granularity": "layer", "levels": [0.0, 0.5], "budget": {"target": 0.25},
                             "method": ref})
    assert space.method == ref and isinstance(space.pruning_method, LargestFirst)
    assert space_from_dict(space.to_dict()) == space
    with pytest.raises(ConfigError, match="cannot be imported"):
        get_method("no_such_module_xyz:Thing")
    with pytest.raises(ConfigError, match="not a PruningMethod"):
        get_method(f"{__name__}:ShrinkOptions")


@pytest.mark.slow  # starts Ray
def test_a_search_through_ray_uses_a_method_defined_only_in_this_file(tmp_path):
    """The Ray workers import `tests.test_method_plugin` from the space file's reference; nothing else knows it."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "plug", "granularity": "sublayer", "levels": [0.0, 0.5, 0.7, 0.9],
                                     "budget": {"target": 0.6, "tolerance": 0.05},  # >= half a level step
                                     "method": "tests.test_method_plugin:LargestFirst"}))
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "plug", "model": {"spec": "tiny", "device": "cpu"}, "space": str(space),
        "data": {"dataset": "synthetic", "n_shots": 16, "seed": 0, "heldout_size": 16},
        "search": {"rounds": 1, "trials_per_round": 3, "max_concurrent": 1, "n_startup_trials": 1},
        "projector": {"enabled": False}, "resources": {"cpu": 1, "gpu": 0}, "storage": str(tmp_path / "runs")}))
    root = tmp_path / "exp"
    home = tmp_path / "home"  # the workers' bank cache (banks are node-local, not in the experiment directory)
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rp", dir="/tmp"), "EFFICIENTLLAVA_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "efficientllava.cli", "search", str(config), "--dir", str(root),
                           "--no-heldout"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in (root / "trials").glob("*.json")]
    assert len(trials) == 3 and all(t.get("status") == "COMPLETE" for t in trials), trials
    assert not (root / "banks").exists()
    (bank,) = [p for p in (home / "banks").iterdir() if p.is_dir()]
    assert {t["result"]["bank"] for t in trials} == {bank.name}
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["spec"]["method"] == "tests.test_method_plugin:LargestFirst"
    assert manifest["format"] == "nested-mask"
