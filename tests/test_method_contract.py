"""Every registered pruning method passes the contract in efficientllava.testing.pruning_methods."""

from __future__ import annotations

import pytest
import torch

from efficientllava.pruning.calibrate import LayerStats
from efficientllava.pruning.methods import get_method, method_names, prune_weight
from efficientllava.pruning.patterns import Pattern
from efficientllava.testing.pruning_methods import PruningMethodContract, correlated_layer

BUILT_IN = ("magnitude", "obs_mask", "sparsegpt", "wanda")


def test_built_in_methods_are_registered():
    assert set(BUILT_IN) <= set(method_names())


class TestRegisteredMethods(PruningMethodContract):
    @pytest.fixture(params=BUILT_IN)
    def method(self, request):
        return get_method(request.param)


class TestSparseGPTWithOptions(PruningMethodContract):
    @pytest.fixture
    def method(self):
        return get_method("sparsegpt", {"percdamp": 0.05, "blocksize": 16})


def test_obs_mask_prunes_lowest_obs_saliency_and_dead_inputs_first():
    w, stats = correlated_layer()
    hessian = stats.hessian.clone()
    hessian[:, 5] = hessian[5, :] = 0.0  # input 5 was always zero
    out = prune_weight("obs_mask", w, LayerStats(hessian, stats.col_sq_norm, 1), 0.5, Pattern())
    assert (out[:, 5] == 0).all()
    h = hessian.clone()
    h[5, 5] = 1.0
    h += 0.01 * torch.diag(h).mean() * torch.eye(h.shape[0])
    d = torch.diag(torch.linalg.inv(h))
    score = w**2 / d**2
    live = torch.ones_like(w, dtype=torch.bool)
    live[:, 5] = False
    pruned, kept = (out == 0) & live, out != 0
    assert score[pruned].max() <= score[kept].min()
    assert torch.equal(out[kept], w[kept])  # masks only: no update
