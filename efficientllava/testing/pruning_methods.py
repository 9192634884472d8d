"""The contract every pruning method passes (subclass `PruningMethodContract`, give it a `method` fixture).

    class TestMyMethod(PruningMethodContract):
        @pytest.fixture
        def method(self):
            return get_method("my_method")

Checks: exact sparsity per level (per matrix or per row, as the method's `scope` says), N:M patterns,
nesting across levels where the method declares it (and that its level index gives the same masks
as `prune`), dtype and device kept, inputs not modified, determinism, sparsity 0 = an unchanged copy.
"""

from __future__ import annotations

import math

import pytest
import torch

from efficientllava.pruning.calibrate import LayerStats
from efficientllava.pruning.methods import NestedMethod, PruningMethod, prune_prepared
from efficientllava.pruning.patterns import Pattern

ROWS, COLS, TOKENS = 32, 64, 256
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)


def correlated_layer(rows: int = ROWS, cols: int = COLS, seed: int = 0) -> tuple[torch.Tensor, LayerStats]:
    """A random weight [rows, cols] and its LayerStats (Hessian and column norms) from correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(cols // 4, cols, generator=g)
    scale = torch.exp(torch.randn(cols, generator=g))
    x = (torch.randn(TOKENS, cols // 4, generator=g) @ basis + 0.3 * torch.randn(TOKENS, cols, generator=g)) * scale
    w = torch.randn(rows, cols, generator=g)
    return w, LayerStats(2.0 / TOKENS * x.T @ x, (x * x).sum(0), TOKENS)


class PruningMethodContract:
    """Contract tests for one `PruningMethod`; subclasses provide the `method` fixture."""

    @pytest.fixture
    def method(self) -> PruningMethod:
        """The method under test (override in a subclass)."""
        raise NotImplementedError

    @staticmethod
    def _calib(method: PruningMethod, stats: LayerStats) -> dict[str, torch.Tensor]:
        return method.prepare(stats if method.stats != "none" else None)

    def test_exact_sparsity_per_level(self, method: PruningMethod) -> None:
        w, stats = correlated_layer()
        calib = self._calib(method, stats)
        for level in LEVELS:
            zeros = prune_prepared(method, w, calib, level, Pattern()) == 0
            if method.scope == "row":
                assert (zeros.sum(1) == math.floor(level * COLS)).all(), level
            else:
                assert int(zeros.sum()) == math.floor(level * w.numel()), level

    @pytest.mark.parametrize("spec", ["2:4", "4:8"])
    def test_nm_pattern_is_kept(self, method: PruningMethod, spec: str) -> None:
        w, stats = correlated_layer()
        pattern = Pattern.parse(spec)
        out = prune_prepared(method, w, self._calib(method, stats), pattern.n / pattern.m, pattern)
        groups = (out == 0).reshape(ROWS, COLS // pattern.m, pattern.m).sum(-1)
        assert (groups == pattern.n).all()

    def test_nesting_where_declared(self, method: PruningMethod) -> None:
        w, stats = correlated_layer(seed=1)
        calib = self._calib(method, stats)
        pruned = [prune_prepared(method, w, calib, level, Pattern()) == 0 for level in LEVELS]
        nests = all(bool((lo & ~hi).sum() == 0) for lo, hi in zip(pruned, pruned[1:], strict=False))
        if method.nested:
            assert nests, "a method that declares nested masks must prune a superset at each higher level"
            assert isinstance(method, NestedMethod)
            index = method.level_index(w, calib, LEVELS, Pattern())
            assert index.dtype == torch.uint8
            for k, mask in enumerate(pruned, start=1):
                assert torch.equal(index < k, mask), f"level index disagrees with prune at level {LEVELS[k - 1]}"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    def test_dtype_device_kept_and_inputs_untouched(self, method: PruningMethod, dtype: torch.dtype) -> None:
        w, stats = correlated_layer(seed=2)
        calib = self._calib(method, stats)
        before = {k: v.clone() for k, v in calib.items()}
        wd = w.to(dtype)
        out = prune_prepared(method, wd, calib, 0.5, Pattern())
        assert out.dtype == dtype and out.device == wd.device and out.shape == wd.shape
        assert torch.equal(wd, w.to(dtype))
        assert all(torch.equal(before[k], v) for k, v in calib.items())
        if method.nested:  # masks only: kept weights are the dense ones
            assert torch.equal(out[out != 0], wd[out != 0])

    def test_deterministic(self, method: PruningMethod) -> None:
        w, stats = correlated_layer(seed=3)
        a = prune_prepared(method, w, self._calib(method, stats), 0.6, Pattern())
        b = prune_prepared(method, w.clone(), self._calib(method, stats), 0.6, Pattern())
        assert torch.equal(a, b)

    def test_zero_sparsity_is_an_unchanged_copy(self, method: PruningMethod) -> None:
        w, stats = correlated_layer(seed=4)
        out = prune_prepared(method, w, self._calib(method, stats), 0.0, Pattern())
        assert torch.equal(out, w) and out.data_ptr() != w.data_ptr()
