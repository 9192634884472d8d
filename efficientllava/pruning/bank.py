"""The variant bank: every (unit, level) pruned once, stored as safetensors, swapped in per trial.

Calibration statistics are collected on the *dense* model (not sequentially on a pruned one),
so each unit's pruned weights are independent of the other units' levels and any policy is a
combination of precomputed variants. Inputs to the language model depend on the projector,
so a bank is tied to one projector version (see `bank_fingerprint`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.pruning.calibrate import collect_stats
from efficientllava.pruning.methods import needs_hessian, prune_weight
from efficientllava.pruning.patterns import Pattern
from efficientllava.pruning.units import prunable_units

MANIFEST = "manifest.json"
HESSIAN_BYTES_PER_PASS = 2 << 30  # calibrate as many layers per forward pass as fit in this budget
PRELOAD_BYTES = 2 << 30  # banks up to this size are held in device memory; larger ones are read per swap


@dataclass(frozen=True)
class BankSpec:
    """What a bank holds: units, their levels, and how they were pruned."""

    granularity: str
    unit_levels: tuple[tuple[str, tuple[float, ...]], ...]
    method: str
    pattern: str
    percdamp: float = 0.01
    blocksize: int = 128

    def fingerprint(self, calibration: str) -> str:
        """Hash of the spec and of the calibration inputs (few-shot ids + projector version)."""
        blob = json.dumps([self.granularity, self.unit_levels, self.method, self.pattern, self.percdamp,
                           self.blocksize, calibration])
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _level_file(root: Path, unit: str, level: float) -> Path:
    return root / unit / f"{level:.4f}.safetensors"


def _layer_groups(units: Sequence, model: nn.Module, need_h: bool) -> list[list[int]]:
    """Group decoder layers so one calibration pass keeps at most HESSIAN_BYTES_PER_PASS of Hessians."""
    layers = sorted({u.layer for u in units})
    if not need_h:
        return [layers]
    per_layer = {}
    for u in units:
        cols = [model.get_submodule(n).in_features for n in u.linears]
        per_layer[u.layer] = per_layer.get(u.layer, 0) + sum(4 * c * c for c in set(cols))
    groups: list[list[int]] = [[]]
    used = 0
    for layer in layers:
        if groups[-1] and used + per_layer[layer] > HESSIAN_BYTES_PER_PASS:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += per_layer[layer]
    return groups


def build_bank(model: nn.Module, batches: list[dict[str, torch.Tensor]], spec: BankSpec, root: Path,
               calibration: str = "", log: bool = False) -> VariantBank:
    """Calibrate on `batches`, prune every (unit, level>0) of `spec` and write the bank to `root`."""
    start = time.perf_counter()
    pattern = Pattern.parse(spec.pattern)
    need_h = needs_hessian(spec.method)
    levels = dict(spec.unit_levels)
    units = [u for u in prunable_units(model, spec.granularity) if u.name in levels]
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    norms: dict[str, dict[str, float]] = {}
    dense_norms: dict[str, float] = {}
    for group in _layer_groups(units, model, need_h):
        group_units = [u for u in units if u.layer in group]
        names = [n for u in group_units for n in u.linears]
        stats = collect_stats(model, batches, names, need_hessian=need_h) if spec.method != "magnitude" else {}
        for unit in group_units:
            for level in levels[unit.name]:
                if level == 0.0:
                    continue
                pruned = {}
                for name in unit.linears:
                    weight = model.get_submodule(name).weight.data
                    w = prune_weight(spec.method, weight, stats.get(name), level, pattern,
                                     blocksize=spec.blocksize, percdamp=spec.percdamp)
                    pruned[name] = w.to("cpu").contiguous()
                    # ||W * M||_F: the dense weights under the mask, as the SRM bound is written. (The
                    # OBS-updated weights' norm grows with sparsity and would invert the penalty.)
                    masked = float((weight.float() * (w != 0)).norm())
                    norms.setdefault(name, {})[f"{level:.4f}"] = masked
                (tmp / unit.name).mkdir(exist_ok=True)
                save_file(pruned, str(_level_file(tmp, unit.name, level)))
            for name in unit.linears:
                dense_norms[name] = float(model.get_submodule(name).weight.data.float().norm())
        del stats
    manifest = {
        "spec": {"granularity": spec.granularity, "unit_levels": {u: list(v) for u, v in spec.unit_levels},
                 "method": spec.method, "pattern": spec.pattern, "percdamp": spec.percdamp,
                 "blocksize": spec.blocksize},
        "fingerprint": spec.fingerprint(calibration),
        "units": {u.name: list(u.linears) for u in units},
        "norms": norms,
        "dense_norms": dense_norms,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # written last: marks the bank complete
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    if log:
        print(f"[bank] {spec.method} {spec.pattern}: {len(units)} units built in {manifest['build_seconds']:.1f}s "
              f"at {root} ({bank_bytes(root) / 2**20:.1f} MiB)", flush=True)
    return VariantBank.open(root)


def bank_bytes(root: Path) -> int:
    """Disk size of a bank directory."""
    return sum(p.stat().st_size for p in Path(root).rglob("*.safetensors"))


class VariantBank:
    """A built bank on disk: pruned weights per (unit, level), loaded lazily (memory-mapped)."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.unit_levels: dict[str, tuple[float, ...]] = {
            u: tuple(v) for u, v in manifest["spec"]["unit_levels"].items()}
        self.unit_linears: dict[str, tuple[str, ...]] = {u: tuple(v) for u, v in manifest["units"].items()}
        self._cache: dict[tuple[str, float], dict[str, torch.Tensor]] = {}
        self._keep = False  # cache loaded variants only once preload() chose to hold the bank in memory

    @classmethod
    def open(cls, root: str | Path) -> VariantBank:
        """Open a complete bank (one whose manifest was written)."""
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise ConfigError(f"{root}: not a complete variant bank (no {MANIFEST}); rebuild it")
        return cls(Path(root), json.loads(path.read_text()))

    @property
    def fingerprint(self) -> str:
        """The fingerprint the bank was built with."""
        return self.manifest["fingerprint"]

    def check(self, unit: str, level: float) -> None:
        """Raise PolicyError if (unit, level) is not in the bank."""
        if unit not in self.unit_levels:
            raise PolicyError(f"unit {unit!r} is not in the variant bank at {self.root}")
        if not any(abs(level - lv) < 1e-9 for lv in self.unit_levels[unit]):
            allowed = ", ".join(f"{lv:g}" for lv in self.unit_levels[unit])
            raise PolicyError(f"{unit}: ratio {level:g} is not a level of the variant bank ({allowed})")

    def tensors(self, unit: str, level: float, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Pruned weights of `unit` at `level`, keyed by linear module name (cached per device)."""
        self.check(unit, level)
        key = (unit, round(level, 6))
        cached = self._cache.get(key)
        if cached is None or next(iter(cached.values())).device != torch.device(device):
            with safe_open(str(_level_file(self.root, unit, level)), framework="pt", device=str(device)) as fh:
                cached = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            if self._keep:
                self._cache[key] = cached
        return cached

    def preload(self, device: torch.device | str, max_bytes: int = PRELOAD_BYTES) -> bool:
        """Hold every variant in memory on `device` if the bank fits in `max_bytes`; returns whether it did.

        Small banks then swap device-to-device; a large one (a 7B model's is ~13 GB per level) is read
        from its memory-mapped files at each swap instead of filling the GPU.
        """
        if bank_bytes(self.root) > max_bytes:
            return False
        self._keep = True
        for unit, levels in self.unit_levels.items():
            for level in levels:
                if level > 0:
                    self.tensors(unit, level, device)
        return True

    def norm(self, linear: str, level: float) -> float:
        """Frobenius norm of one linear's dense weight under its mask at `level` (the dense norm at 0)."""
        if level == 0.0:
            return self.manifest["dense_norms"][linear]
        return self.manifest["norms"][linear][f"{level:.4f}"]

    @functools.cached_property
    def pruned_norms(self) -> Mapping[tuple[str, float], float]:
        """All pruned norms keyed by (linear, level), as the SRM penalty takes them."""
        return {(lin, float(lv)): v for lin, per in self.manifest["norms"].items() for lv, v in per.items()}

    @property
    def dense_norms(self) -> Mapping[str, float]:
        """Dense Frobenius norm of each linear."""
        return self.manifest["dense_norms"]
