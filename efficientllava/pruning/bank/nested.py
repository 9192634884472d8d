"""Nested-mask bank: one uint8 level index per weight holds every level of a nesting method.

For a method whose masks nest across levels (magnitude, Wanda, mask-only OBS), the weight (i, j)
is kept at level number k (1-based, ascending non-zero levels) exactly when `index[i, j] >= k`. A
variant is therefore the dense weight times `index >= k`, computed on the device at swap time; the
whole bank is at most 1 byte per weight, whatever the number of levels (up to 255).

Files: `index/<unit>.safetensors` (one uint8 tensor per linear, keyed by its module name) and the
manifest, which also holds every level's norm (from a weighted histogram of the index at build).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from efficientllava.pruning.bank.base import (
    VariantBank,
    check_files,
    level_key,
    linear_weight,
    load_tensors,
    save_tensors,
)
from efficientllava.pruning.calibrate import LayerStats
from efficientllava.pruning.methods import NestedMethod
from efficientllava.pruning.patterns import Pattern, check_nm_fits, check_sparsity

FORMAT = "nested-mask"
VERSION = 1


def index_file(unit: str) -> str:
    """Relative path of a unit's index file."""
    return f"index/{unit}.safetensors"


def level_norms(weight: torch.Tensor, index: torch.Tensor, levels: Sequence[float]) -> dict[str, float]:
    """||W * (index >= k)||_F for each level k, from one weighted histogram of the index."""
    counts = torch.bincount(index.reshape(-1).long(), weights=weight.detach().reshape(-1).double() ** 2,
                            minlength=len(levels) + 1)
    kept = counts.flip(0).cumsum(0).flip(0)  # kept[k] = sum of w^2 over index >= k
    return {level_key(lv): math.sqrt(float(kept[k + 1])) for k, lv in enumerate(levels)}


def build_unit_index(method: NestedMethod, model: nn.Module, linears: Sequence[str], levels: Sequence[float],
                     pattern: Pattern, calib: Mapping[str, Mapping[str, torch.Tensor]], root: Path,
                     unit: str) -> tuple[dict[str, dict[str, float]], int]:
    """Compute and write one unit's level index; returns its norms per linear and the file's size."""
    for level in levels:
        check_sparsity(level, pattern)
    tensors, norms = {}, {}
    for name in linears:
        weight = linear_weight(model, name)
        check_nm_fits(pattern, weight.shape[1])
        index = method.level_index(weight, calib[name], levels, pattern)
        norms[name] = level_norms(weight, index, levels)
        tensors[name] = index
    return norms, save_tensors(root / index_file(unit), tensors)


def build_nested(method: NestedMethod, model: nn.Module, unit_linears: Mapping[str, Sequence[str]],
                 unit_levels: Mapping[str, Sequence[float]], pattern: Pattern,
                 stats: Mapping[str, LayerStats | None], root: Path) -> dict[str, Any]:
    """Write the index files of the units in `unit_linears`; returns their manifest entries (norms, files)."""
    prepared: dict[int, dict[str, torch.Tensor]] = {}  # one per input stream (q/k/v share one)
    calib = {}
    for names in unit_linears.values():
        for name in names:
            st = stats.get(name)
            key = id(st)
            if key not in prepared:
                prepared[key] = method.prepare(st)
            calib[name] = prepared[key]
    norms: dict[str, dict[str, float]] = {}
    files: dict[str, int] = {}
    for unit, names in unit_linears.items():
        levels = [lv for lv in unit_levels[unit] if lv > 0]
        if not levels:
            continue
        unit_norms, size = build_unit_index(method, model, names, levels, pattern, calib, root, unit)
        norms.update(unit_norms)
        files[index_file(unit)] = size
    return {"norms": norms, "files": files}


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def keep_where(target: torch.Tensor, dense: torch.Tensor, index: torch.Tensor, k: int) -> None:
    """target = dense where index >= k, else +0 (bit-exact copies of the kept weights)."""
    if target.device.type == dense.device.type == index.device.type == "cpu":
        # torch's CPU kernels for mixed-dtype selects are ~20x slower than a copy; numpy's are not. The
        # weights' bits times 0/1, as integers, are exactly the kept weight or +0.0.
        ints = _INT_OF_SIZE[target.element_size()]
        out = target.detach().view(ints).numpy()
        np.multiply(dense.detach().view(ints).numpy(), index.numpy() >= k, out=out)
    else:
        keep_where_torch(target, dense, index, k)


def keep_where_torch(target: torch.Tensor, dense: torch.Tensor, index: torch.Tensor, k: int) -> None:
    """`keep_where` in torch ops (GPU: memory-bound elementwise kernels)."""
    if dense.device == target.device:
        torch.where(index >= k, dense, dense.new_zeros(()), out=target)
    else:  # a dense copy kept off the device (e.g. host memory for a large model on a GPU)
        target.copy_(dense, non_blocking=True)
        target.masked_fill_(index < k, 0)


class NestedMaskBank(VariantBank):
    """A bank of level indices: materialises dense x (index >= k) on the weights' device."""

    FORMAT = FORMAT
    VERSION = VERSION

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        super().__init__(root, manifest)
        self._position = {u: {round(lv, 6): k + 1 for k, lv in enumerate(self.nonzero_levels(u))}
                          for u in self.unit_levels}

    def validate(self) -> None:
        """Format version and every index file's size."""
        super().validate()
        check_files(self.root, self.manifest["files"])

    def _index(self, unit: str, device: torch.device) -> dict[str, torch.Tensor]:
        cached = self._cache.get(unit)
        if cached is not None and next(iter(cached.values())).device == device:
            return cached
        tensors, _ = load_tensors(self.root / index_file(unit))  # memory-mapped: shared by every process
        if device.type != "cpu":
            tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        if self._keep:
            self._cache[unit] = tensors
        return tensors

    def write(self, unit: str, level: float, targets: Mapping[str, torch.Tensor],
              dense: Mapping[str, torch.Tensor]) -> None:
        """target = dense where index >= k, else 0 (k: the level's position among the unit's levels)."""
        k = self._position[unit][round(level, 6)]
        device = next(iter(targets.values())).device
        index = self._index(unit, device)
        for name, target in targets.items():
            keep_where(target, dense[name], index[name], k)

    def expected_bytes(self) -> int:
        """The index files' bytes."""
        return sum(self.manifest["files"].values())

    def _preload(self, device: torch.device) -> None:
        for unit in self.unit_levels:
            if self.nonzero_levels(unit):
                self._index(unit, device)
