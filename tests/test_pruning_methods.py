"""Pruning criteria: achieved sparsity, N:M patterns, SparseGPT vs its reference, reconstruction error."""

from __future__ import annotations

import math

import pytest
import torch

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.pruning.calibrate import LayerStats
from efficientllava.pruning.masks import level_index, nm_mask, unstructured_mask
from efficientllava.pruning.methods import get_method, prune_weight
from efficientllava.pruning.methods.sparsegpt import sparsegpt_prune
from efficientllava.pruning.patterns import Pattern

METHODS = ("sparsegpt", "wanda", "magnitude", "obs_mask")  # the built-in methods

ROWS, COLS, TOKENS = 48, 96, 384


def correlated_inputs(cols: int = COLS, tokens: int = TOKENS, seed: int = 0) -> torch.Tensor:
    """Token rows X [tokens, cols]: low-rank correlated features, unevenly scaled (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(cols // 4, cols, generator=g)
    scale = torch.exp(torch.randn(cols, generator=g))
    low_rank = torch.randn(tokens, cols // 4, generator=g) @ basis
    return (low_rank + 0.3 * torch.randn(tokens, cols, generator=g)) * scale


def layer(rows: int = ROWS, cols: int = COLS, seed: int = 0) -> tuple[torch.Tensor, LayerStats, torch.Tensor]:
    """A random weight, its LayerStats as calibrate.py defines them, and the inputs X."""
    x = correlated_inputs(cols, seed=seed)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    return w, LayerStats(2.0 / x.shape[0] * x.T @ x, (x * x).sum(0), x.shape[0]), x


def prune(method: str, w, stats, sparsity, pattern, **kw):
    """prune_weight; SparseGPT-only options (blocksize, percdamp) are dropped for the other methods."""
    if method != "sparsegpt":
        kw = {}
    return prune_weight(method, w, stats, sparsity, Pattern.parse(pattern), **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_unstructured_sparsity_is_exact(method, sparsity):
    w, stats, _ = layer()
    out = prune(method, w, stats, sparsity, "unstructured", blocksize=40)  # 40 does not divide 96
    zeros = out == 0
    if get_method(method).scope == "row":  # wanda: per output row
        assert (zeros.sum(1) == math.floor(sparsity * COLS)).all()
    else:  # per matrix
        assert zeros.sum().item() == math.floor(sparsity * w.numel())
    if method != "sparsegpt":  # kept weights are untouched; SparseGPT updates them
        assert torch.equal(out[~zeros], w[~zeros])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_is_exact(method, pattern):
    w, stats, _ = layer()
    p = Pattern.parse(pattern)
    out = prune(method, w, stats, p.n / p.m, p, blocksize=32)
    groups = (out == 0).reshape(ROWS, COLS // p.m, p.m).sum(-1)
    assert (groups == p.n).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_zero_sparsity_returns_weight_unchanged(method, pattern):
    w, stats, _ = layer()
    w[:, 5] = 0.0  # even a column SparseGPT would otherwise touch
    out = prune(method, w.half(), stats, 0.0, pattern)
    assert out.dtype == torch.float16 and torch.equal(out, w.half())


@pytest.mark.parametrize("method", METHODS)
def test_dtype_is_kept_and_input_not_modified(method):
    w, stats, _ = layer()
    wb, h = w.bfloat16(), stats.hessian.clone()
    out = prune(method, wb, stats, 0.5, "unstructured")
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert torch.equal(wb, w.bfloat16()) and torch.equal(stats.hessian, h)


def test_magnitude_prunes_smallest_and_wanda_weighs_inputs():
    w, stats, _ = layer()
    out = prune("magnitude", w, stats, 0.5, "unstructured")
    assert w[out == 0].abs().max() <= w[out != 0].abs().min()
    norms = torch.ones(COLS)
    norms[7] = 1e8  # a huge input channel: Wanda keeps its weights, magnitude does not care
    wanda = prune("wanda", w, LayerStats(None, norms, 1), 0.9, "unstructured")
    assert (wanda[:, 7] != 0).all()
    score = w.abs() * norms.sqrt()
    for r in range(ROWS):  # per-row comparison
        assert score[r][wanda[r] == 0].max() <= score[r][wanda[r] != 0].min()


def test_masks_break_ties_by_lower_index():
    scores = torch.ones(2, 8)
    assert unstructured_mask(scores, 0.5, per_row=True)[:, :4].all()
    assert unstructured_mask(scores, 0.25, per_row=False).reshape(-1)[:4].all()
    assert unstructured_mask(scores, 0.25, per_row=False).sum() == 4
    assert nm_mask(scores, 2, 4).reshape(2, 2, 4)[..., :2].all()


def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """IST-DASLab/sparsegpt `SparseGPT.fasterprune` (losses dropped); `<` for its per-block `<=` threshold."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp < thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = (
                    W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                )
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize(
    "sparsity,pattern", [(0.5, "unstructured"), (0.25, "unstructured"), (0.5, "2:4"), (0.5, "4:8")]
)
def test_sparsegpt_matches_reference_implementation(sparsity, pattern):
    w, stats, _ = layer()
    stats.hessian[:, 3] = stats.hessian[3, :] = 0.0  # a dead input column
    p = Pattern.parse(pattern)
    ours = sparsegpt_prune(w, stats.hessian, sparsity, p, blocksize=32)
    ref = reference_fasterprune(w, stats.hessian, sparsity, p.n, p.m, blocksize=32)
    assert (ours[:, 3] == 0).all()
    assert torch.equal(ours == 0, ref == 0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def recon_errors(pattern: str) -> dict[str, float]:
    """||(W - W_p) X^T||_F of each method at 50% on a layer with correlated inputs."""
    w, stats, x = layer()
    return {m: ((w - prune(m, w, stats, 0.5, pattern, blocksize=32)) @ x.T).norm().item() for m in METHODS}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_has_lowest_reconstruction_error(pattern):
    err = recon_errors(pattern)
    print(pattern, err)
    assert err["sparsegpt"] < 0.8 * err["wanda"] and err["wanda"] < err["magnitude"], err


def test_bad_inputs_give_clear_errors():
    w, stats, _ = layer()
    for method in METHODS:
        with pytest.raises(PolicyError, match="does not fit pattern 2:4"):
            prune(method, w, stats, 0.6, "2:4")
        with pytest.raises(PolicyError, match="divisible by 8"):
            prune(
                method, w[:, :92], LayerStats(stats.hessian[:92, :92], stats.col_sq_norm[:92], 1), 0.5, "4:8"
            )
        with pytest.raises(PolicyError, match=r"out of range"):
            prune(method, w, stats, 1.0, "unstructured")
    with pytest.raises(ConfigError, match="'obs'.*magnitude, obs_mask, sparsegpt, wanda"):
        prune_weight("obs", w, stats, 0.5, Pattern())
    with pytest.raises(ConfigError, match="'1:4'.*unstructured, 2:4, 4:8"):
        Pattern.parse("1:4")
    with pytest.raises(ConfigError, match="multiple of m=8"):
        prune("sparsegpt", w, stats, 0.5, "4:8", blocksize=20)
    with pytest.raises(ConfigError, match="raise percdamp"):
        sparsegpt_prune(w, torch.ones(COLS, COLS), 0.5, Pattern(), percdamp=0.0)
    for method in ("sparsegpt", "obs_mask"):
        with pytest.raises(ValueError, match="Hessian"):
            prune_weight(method, w, LayerStats(None, stats.col_sq_norm, 1), 0.5, Pattern())
    with pytest.raises(ValueError, match="calibration statistics"):
        prune_weight("wanda", w, None, 0.5, Pattern())
    with pytest.raises(ConfigError, match="method.percdamp"):
        get_method("sparsegpt", {"percdamp": 0})
    with pytest.raises(ConfigError, match="unknown key 'blocksize'.*'wanda'"):
        get_method("wanda", {"blocksize": 8})


def test_pattern_round_trip_and_hessian_need():
    for spec in ("unstructured", "2:4", "4:8"):
        assert str(Pattern.parse(spec)) == spec
    assert Pattern.parse("2:4").is_nm and not Pattern().is_nm
    assert [get_method(m).stats == "hessian" for m in METHODS] == [True, False, False, True]
    assert [get_method(m).nested for m in METHODS] == [False, True, True, True]


@pytest.mark.parametrize("per_row", [False, True])
def test_level_index_agrees_with_lowest_mask_on_ties_signs_and_zeros(per_row):
    """The radix-sorted level index prunes exactly what the float sort does, -0.0 == +0.0 included."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (6, 16), generator=g).float() * 0.5
    scores[0, :4] = -0.0
    levels = [i / 16 for i in range(1, 16)]
    index = level_index(scores, levels, Pattern(), per_row)
    for k, level in enumerate(levels, start=1):
        assert torch.equal(index < k, unstructured_mask(scores, level, per_row)), level
    nm = level_index(scores, [0.5], Pattern(2, 4), False)
    assert torch.equal(nm < 1, nm_mask(scores, 2, 4))
