"""Compact per-level bank, for methods whose masks do not nest (SparseGPT's updated weights differ per level).

A variant of one linear is stored as a bitmask (1 bit per weight) plus its kept values only, in the
model's dtype. Variants are built lazily: the bank first stores each layer's prepared calibration
state (for SparseGPT, the upper triangle of its damped inverse Hessian's Cholesky factor, once per
input stream), and a variant is computed the first time a trial asks for it, written atomically
under a per-variant file lock (several workers on a node may ask at once), and read from disk by
everyone after. Once every variant of a layer exists, that layer's calibration state is deleted.
`eager=True` builds everything at once and never stores calibration state.

Files (all memory-mapped when read, so every worker process on a node shares one copy through the
page cache): `calib/layer.<i>.safetensors`, `levels/<unit>/<level>.safetensors` (`<linear>.mask`,
`<linear>.values`; the variant's norms in its metadata), and the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from efficientllava.filelock import file_lock
from efficientllava.pruning.bank.base import (
    DamagedBankError,
    VariantBank,
    check_files,
    level_key,
    linear_weight,
    load_tensors,
    read_metadata,
    save_tensors,
)
from efficientllava.pruning.calibrate import LayerStats
from efficientllava.pruning.methods import PruningMethod, prune_prepared
from efficientllava.pruning.patterns import Pattern

FORMAT = "compact"
VERSION = 1
_SEP = "::"  # calibration keys are "<stream linear>::<tensor name>"


def level_file(unit: str, level: float) -> str:
    """Relative path of one variant's file."""
    return f"levels/{unit}/{level_key(level)}.safetensors"


def calib_file(layer: int) -> str:
    """Relative path of one decoder layer's calibration state."""
    return f"calib/layer.{layer}.safetensors"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 [ceil(numel / 8)], bit b of byte i = element 8i + b (numpy's little bit order)."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return pack_mask_torch(flat)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_mask`: a flat bool tensor of `numel` elements, on `packed`'s device."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel, bitorder="little").view(bool))
    return unpack_mask_torch(packed, numel)


def pack_mask_torch(flat: torch.Tensor) -> torch.Tensor:
    """`pack_mask` in torch ops (any device)."""
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8, device=flat.device)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_mask_torch(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """`unpack_mask` in torch ops (any device)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).view(-1)[:numel].bool()


def encode_variant(pruned: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(packed mask of the non-zero weights, their values, ||dense * mask||_F)."""
    mask = pruned != 0
    return pack_mask(mask), pruned[mask], float(dense.float().masked_fill(~mask, 0).norm())


def _prepare_streams(method: PruningMethod, names: Sequence[str], stats: Mapping[str, LayerStats | None]
                     ) -> tuple[dict[str, str], dict[str, dict[str, torch.Tensor]]]:
    """Linear -> stream name (the first linear fed that input), and each stream's prepared tensors."""
    streams: dict[str, str] = {}
    prepared: dict[str, dict[str, torch.Tensor]] = {}
    first: dict[int, str] = {}
    for name in names:
        st = stats.get(name)
        stream = first.setdefault(id(st), name)
        streams[name] = stream
        if stream not in prepared:
            prepared[stream] = method.prepare(st)
    return streams, prepared


def _calib_of(streams: Mapping[str, str], tensors: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = streams[name] + _SEP
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def build_variant(method: PruningMethod, pattern: Pattern, linears: Sequence[str], level: float,
                  dense: Mapping[str, torch.Tensor], calib: Mapping[str, Mapping[str, torch.Tensor]],
                  path: Path) -> dict[str, dict[str, float]]:
    """Prune one unit's linears at `level`, write the variant file; returns its norms."""
    tensors: dict[str, torch.Tensor] = {}
    norms: dict[str, dict[str, float]] = {}
    for name in linears:
        pruned = prune_prepared(method, dense[name], calib[name], level, pattern)
        tensors[f"{name}.mask"], tensors[f"{name}.values"], norm = encode_variant(pruned, dense[name])
        norms[name] = {level_key(level): norm}
    save_tensors(path, tensors, {"norms": json.dumps(norms)})
    return norms


def build_compact(method: PruningMethod, model: nn.Module, unit_linears: Mapping[str, Sequence[str]],
                  unit_levels: Mapping[str, Sequence[float]], unit_layer: Mapping[str, int], pattern: Pattern,
                  stats: Mapping[str, LayerStats | None], root: Path, eager: bool) -> dict[str, Any]:
    """Store the calibration state of the units in `unit_linears` (lazy) or all their variants (eager)."""
    names = [n for ns in unit_linears.values() for n in ns]
    streams, prepared = _prepare_streams(method, names, stats)
    out: dict[str, Any] = {"streams": streams, "files": {}, "calib_files": {}, "norms": {}}
    if eager:
        calib = {n: prepared[streams[n]] for n in names}
        for unit, linears in unit_linears.items():
            dense = {n: linear_weight(model, n) for n in linears}
            for level in unit_levels[unit]:
                if level > 0:
                    norms = build_variant(method, pattern, linears, level, dense, calib,
                                          root / level_file(unit, level))
                    for lin, per in norms.items():
                        out["norms"].setdefault(lin, {}).update(per)
                    out["files"][level_file(unit, level)] = (root / level_file(unit, level)).stat().st_size
        return out
    if method.stats == "none":
        return out
    for layer in sorted({unit_layer[u] for u in unit_linears}):
        layer_streams = {streams[n] for u, ns in unit_linears.items() if unit_layer[u] == layer for n in ns}
        tensors = {f"{s}{_SEP}{k}": v for s in sorted(layer_streams) for k, v in prepared[s].items()}
        rel = calib_file(layer)
        out["files"][rel] = save_tensors(root / rel, tensors)
        out["calib_files"][str(layer)] = rel
    return out


class CompactBank(VariantBank):
    """Per-level bitmask + kept values; variants built on first request from stored calibration state."""

    FORMAT = FORMAT
    VERSION = VERSION

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        super().__init__(root, manifest)
        self._streams: dict[str, str] = manifest["streams"]
        self._unit_layer: dict[str, int] = {u: int(v) for u, v in manifest["unit_layer"].items()}
        self._shapes: dict[str, tuple[int, int]] = {k: (int(v[0]), int(v[1])) for k, v in manifest["shapes"].items()}
        self._built: set[tuple[str, str]] = set()
        for unit in self.unit_levels:
            for level in self.nonzero_levels(unit):
                if (self.root / level_file(unit, level)).is_file():
                    self._register(unit, level)

    def validate(self) -> None:
        """Format version and file sizes; a layer's calibration may be gone only once its variants all exist."""
        super().validate()
        calib = set(self.manifest["calib_files"].values())
        check_files(self.root, self.manifest["files"], {rel: True for rel in calib})
        for layer, rel in self.manifest["calib_files"].items():
            if not (self.root / rel).is_file() and not self._layer_complete(int(layer)):
                raise DamagedBankError(f"{self.root}: calibration state {rel} is missing but layer {layer} still "
                                       "has unbuilt variants; delete the bank and rebuild it")

    # -- lazy building ---------------------------------------------------------------------------
    def _register(self, unit: str, level: float) -> None:
        """Read a variant file's norms (DamagedBankError if it is unreadable)."""
        meta = read_metadata(self.root / level_file(unit, level))
        try:
            self._add_norms(json.loads(meta["norms"]))
        except (KeyError, ValueError) as exc:
            raise DamagedBankError(f"bank file {level_file(unit, level)} has no norms ({exc!r}); rebuild the bank") from None
        self._built.add((unit, level_key(level)))

    def _layer_complete(self, layer: int) -> bool:
        return all((self.root / level_file(u, lv)).is_file()
                   for u, ly in self._unit_layer.items() if ly == layer for lv in self.nonzero_levels(u))

    def is_built(self, unit: str, level: float) -> bool:
        """Whether the variant (unit, level) exists on disk."""
        return (unit, level_key(level)) in self._built or (self.root / level_file(unit, level)).is_file()

    def ensure(self, unit: str, level: float, dense: Mapping[str, torch.Tensor]) -> None:
        """Build (unit, level) from the stored calibration state unless some process already has."""
        self.check(unit, level)
        if level == 0.0 or (unit, level_key(level)) in self._built:
            return
        path = self.root / level_file(unit, level)
        if not path.is_file():
            with file_lock(self.root / "locks" / f"{unit}@{level_key(level)}.lock"):
                if not path.is_file():
                    self._build(unit, level, dense, path)
        self._register(unit, level)

    def _build(self, unit: str, level: float, dense: Mapping[str, torch.Tensor], path: Path) -> None:
        layer = self._unit_layer[unit]
        linears = self.unit_linears[unit]
        calib: dict[str, dict[str, torch.Tensor]] = {n: {} for n in linears}
        if self.method.stats != "none":
            rel = self.manifest["calib_files"][str(layer)]
            if not (self.root / rel).is_file():
                raise DamagedBankError(f"{self.root}: variant {unit}@{level:g} is missing and its calibration "
                                       f"state {rel} is gone; delete the bank and rebuild it")
            tensors, _ = load_tensors(self.root / rel)
            calib = {n: _calib_of(self._streams, tensors, n) for n in linears}
        build_variant(self.method, self.pattern, linears, level, dense, calib, path)
        if self.method.stats != "none" and self._layer_complete(layer):
            (self.root / self.manifest["calib_files"][str(layer)]).unlink(missing_ok=True)

    # -- materialising ---------------------------------------------------------------------------
    def _variant(self, unit: str, level: float, device: torch.device) -> dict[str, torch.Tensor]:
        """The stored (encoded) tensors of a variant: memory-mapped views on CPU, copies on another device."""
        tensors, _ = load_tensors(self.root / level_file(unit, level), device)
        return tensors

    def _decode(self, unit: str, level: float, device: torch.device) -> dict[str, torch.Tensor]:
        dtype = getattr(torch, self.manifest["dtype"])
        out = {n: torch.empty(self._shapes[n], dtype=dtype, device=device) for n in self.unit_linears[unit]}
        self._scatter(out, self._variant(unit, level, device))
        return out

    @staticmethod
    def _scatter(targets: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
        for name, target in targets.items():
            mask = unpack_mask(tensors[f"{name}.mask"], target.numel())
            target.zero_()
            target.view(-1).masked_scatter_(mask, tensors[f"{name}.values"])

    def write(self, unit: str, level: float, targets: Mapping[str, torch.Tensor],
              dense: Mapping[str, torch.Tensor]) -> None:
        """target = 0 with the kept values scattered in at the mask's set bits (a copy if preloaded)."""
        self.ensure(unit, level, dense)
        device = next(iter(targets.values())).device
        key = (unit, level_key(level))
        decoded = self._cache.get(key)
        if decoded is None or next(iter(decoded.values())).device != device:
            self._scatter(targets, self._variant(unit, level, device))
            if self._keep:
                self._cache[key] = {n: t.detach().clone() for n, t in targets.items()}
            return
        for name, target in targets.items():
            target.copy_(decoded[name], non_blocking=True)

    def expected_bytes(self) -> int:
        """Bytes `preload` would hold: every level decoded to the dense layout (swaps are then copies).

        Only small banks are preloaded (each worker then holds its own decoded copy); larger ones are
        read from the shared memory-mapped files at each swap.
        """
        itemsize = torch.empty((), dtype=getattr(torch, self.manifest["dtype"])).element_size()
        return sum(self._shapes[n][0] * self._shapes[n][1] * itemsize * len(self.nonzero_levels(u))
                   for u, linears in self.unit_linears.items() for n in linears)

    def _preload(self, device: torch.device) -> None:
        for unit, level in sorted(self._built):
            key = (unit, level)
            if key not in self._cache:
                self._cache[key] = self._decode(unit, float(level), device)
