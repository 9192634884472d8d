"""What every variant-bank format shares: the spec, the manifest, the fingerprint, and the bank protocol.

A bank holds, for every prunable unit and each of its sparsity levels, what it takes to put that
unit's pruned weights into the model. Calibration statistics come from the *dense* model (not
sequentially from a pruned one), so a unit's variants do not depend on the other units' levels and
any policy is a combination of stored variants. Banks are caches: a directory named by the
fingerprint of everything it depends on, built atomically, and a damaged one raises
`DamagedBankError` so the caller can delete and rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from efficientllava.errors import ConfigError, EfficientLLaVAError, PolicyError
from efficientllava.pruning.methods import MethodOptions, PruningMethod, get_method
from efficientllava.pruning.patterns import Pattern

MANIFEST = "manifest.json"
PRELOAD_BYTES = 2 << 30  # banks up to this size are held in device memory; larger ones are read per swap
_LEVEL_DIGITS = 6


class DamagedBankError(EfficientLLaVAError):
    """A bank directory is incomplete, truncated or of another format version: delete it and rebuild."""


@dataclass(frozen=True)
class BankSpec:
    """What a bank holds: units, their levels, and how they are pruned (method with options, pattern)."""

    granularity: str
    unit_levels: tuple[tuple[str, tuple[float, ...]], ...]
    method: str
    pattern: str = "unstructured"
    method_options: MethodOptions | Mapping[str, Any] | None = None
    pruning_method: PruningMethod = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Resolve the method (ConfigError for an unknown one or bad options) and check the pattern."""
        method = get_method(self.method, self.method_options)
        object.__setattr__(self, "pruning_method", method)
        object.__setattr__(self, "method_options", method.options)
        Pattern.parse(self.pattern)
        levels = tuple((str(u), tuple(sorted({float(lv) for lv in lvs}))) for u, lvs in self.unit_levels)
        object.__setattr__(self, "unit_levels", levels)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (the manifest's `spec`)."""
        return {"granularity": self.granularity, "unit_levels": {u: list(v) for u, v in self.unit_levels},
                "method": self.method, "options": self.pruning_method.options.as_dict(), "pattern": self.pattern}


def linear_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The weight tensor of the nn.Linear `name` of `model` (detached)."""
    module = model.get_submodule(name)
    if not isinstance(module, torch.nn.Linear):
        raise ConfigError(f"{name!r} is not an nn.Linear of {type(model).__name__}")
    return module.weight.detach()


def bank_fingerprint(spec: BankSpec, fmt: str, version: int, source: str, calibration: str, dtype: str) -> str:
    """Hash of everything a bank's content depends on.

    `source` names the model weights (checkpoint path or id), `calibration` the calibration inputs
    (few-shot set and projector version); a method that needs no statistics ignores the latter, so
    its bank survives projector updates.
    """
    calib = calibration if spec.pruning_method.stats != "none" else ""
    blob = json.dumps([fmt, version, spec.as_dict(), source, calib, dtype], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def level_key(level: float) -> str:
    """A level's name in files and manifests."""
    return f"{level:.4f}"


def bank_bytes(root: str | Path) -> int:
    """Disk size of a bank directory (every file in it)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a complete bank; DamagedBankError if it is missing or unreadable."""
    path = Path(root) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DamagedBankError(f"{root}: not a complete variant bank ({MANIFEST}: {exc}); rebuild it") from None


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (last: its presence marks the bank complete)."""
    tmp = Path(root) / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, Path(root) / MANIFEST)


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Write safetensors atomically (temp file + rename); returns the file's size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
    os.replace(tmp, path)
    return path.stat().st_size


def load_tensors(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a bank file (memory-mapped on CPU); DamagedBankError if it is unreadable."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error type for truncated or garbled files
        raise DamagedBankError(f"bank file {path} is unreadable ({exc}); delete the bank and rebuild it") from None


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a bank file without reading its tensors; DamagedBankError if it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise DamagedBankError(f"bank file {path} is unreadable ({exc}); delete the bank and rebuild it") from None


def check_files(root: Path, files: Mapping[str, int], optional: Mapping[str, bool] | None = None) -> None:
    """Raise DamagedBankError unless every listed file exists with its recorded size."""
    for rel, size in files.items():
        path = root / rel
        if not path.is_file():
            if optional and optional.get(rel):
                continue
            raise DamagedBankError(f"{root}: bank file {rel} is missing; delete the bank and rebuild it")
        if path.stat().st_size != size:
            raise DamagedBankError(f"{root}: bank file {rel} has {path.stat().st_size} bytes, expected {size}; "
                                   "delete the bank and rebuild it")


class VariantBank(ABC):
    """A built bank on disk (any format): what the Materializer and the SRM penalty read.

    `write(unit, level, targets, dense)` puts the unit's variant at `level` into `targets` (the
    model's weight tensors), given the dense weights; `ensure` makes a lazily built variant exist
    first (and its norms known). `pruned_norms` are Frobenius norms of the *dense* weights under each
    variant's mask, keyed `(linear, level)`.
    """

    FORMAT: str = ""
    VERSION: int = 0

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest
        try:
            self.unit_levels: dict[str, tuple[float, ...]] = {
                u: tuple(float(x) for x in v) for u, v in manifest["spec"]["unit_levels"].items()}
            self.unit_linears: dict[str, tuple[str, ...]] = {u: tuple(v) for u, v in manifest["units"].items()}
            self._dense_norms: dict[str, float] = {k: float(v) for k, v in manifest["dense_norms"].items()}
            self._norms: dict[tuple[str, float], float] = {
                (lin, float(lv)): float(v) for lin, per in manifest["norms"].items() for lv, v in per.items()}
            self.method = get_method(manifest["spec"]["method"], manifest["spec"]["options"])
            self.pattern = Pattern.parse(manifest["spec"]["pattern"])
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise DamagedBankError(f"{root}: the bank manifest is malformed ({exc!r}); rebuild it") from None
        self._cache: dict[Any, Any] = {}
        self._keep = False  # cache loaded data only once preload() chose to hold the bank in memory

    def validate(self) -> None:
        """Raise DamagedBankError if the format version differs or a file is missing or truncated."""
        if self.manifest.get("format") != self.FORMAT or self.manifest.get("version") != self.VERSION:
            raise DamagedBankError(
                f"{self.root}: bank format {self.manifest.get('format')} v{self.manifest.get('version')}, this "
                f"version reads {self.FORMAT} v{self.VERSION}; delete the bank and rebuild it")

    @property
    def fingerprint(self) -> str:
        """The fingerprint the bank was built with (also its directory name when opened through a cache)."""
        return self.manifest["fingerprint"]

    # -- levels ----------------------------------------------------------------------------------
    def check(self, unit: str, level: float) -> None:
        """Raise PolicyError if (unit, level) is not in the bank."""
        if unit not in self.unit_levels:
            raise PolicyError(f"unit {unit!r} is not in the variant bank at {self.root}")
        if not any(abs(level - lv) < 1e-9 for lv in self.unit_levels[unit]):
            allowed = ", ".join(f"{lv:g}" for lv in self.unit_levels[unit])
            raise PolicyError(f"{unit}: ratio {level:g} is not a level of the variant bank ({allowed})")

    def nonzero_levels(self, unit: str) -> tuple[float, ...]:
        """The unit's levels above 0, ascending."""
        return tuple(lv for lv in self.unit_levels[unit] if lv > 0)

    def ensure(self, unit: str, level: float, dense: Mapping[str, torch.Tensor]) -> None:
        """Make the variant (unit, level) available (lazy formats build it here); a no-op by default."""
        self.check(unit, level)

    @abstractmethod
    def write(self, unit: str, level: float, targets: Mapping[str, torch.Tensor],
              dense: Mapping[str, torch.Tensor]) -> None:
        """Set each target weight of `unit` (keyed by linear name) to its variant at `level` > 0."""

    def variant(self, unit: str, level: float, dense: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fresh tensors holding `unit`'s pruned weights at `level` (for inspection and tests)."""
        self.check(unit, level)
        out = {n: torch.empty_like(dense[n]) for n in self.unit_linears[unit]}
        if level == 0.0:
            for n, t in out.items():
                t.copy_(dense[n])
        else:
            self.ensure(unit, level, dense)
            self.write(unit, level, out, dense)
        return out

    # -- memory ----------------------------------------------------------------------------------
    @abstractmethod
    def expected_bytes(self) -> int:
        """Bytes of the variant data once every level is built (what `preload` would hold)."""

    def preload(self, device: torch.device | str, max_bytes: int = PRELOAD_BYTES) -> bool:
        """Hold the bank's variant data on `device` if it fits in `max_bytes`; returns whether it does.

        Small banks then swap device-to-device; a large one is read from its memory-mapped files
        (shared by every process on the node through the page cache) at each swap instead.
        """
        if self.expected_bytes() > max_bytes:
            return False
        self._keep = True
        self._preload(torch.device(device))
        return True

    @abstractmethod
    def _preload(self, device: torch.device) -> None:
        """Load what exists now into the cache on `device`."""

    # -- norms -----------------------------------------------------------------------------------
    def norm(self, linear: str, level: float) -> float:
        """Frobenius norm of one linear's dense weight under its mask at `level` (the dense norm at 0)."""
        if level == 0.0:
            return self._dense_norms[linear]
        key = (linear, round(float(level), _LEVEL_DIGITS))
        if key not in self._norms:
            raise PolicyError(f"no norm for {linear} at level {level:g}: that variant is not built yet "
                              "(Materializer.prepare builds it)")
        return self._norms[key]

    @property
    def pruned_norms(self) -> Mapping[tuple[str, float], float]:
        """Norms of every variant known so far, keyed by (linear, level), as the SRM penalty takes them."""
        return types.MappingProxyType(self._norms)

    @property
    def dense_norms(self) -> Mapping[str, float]:
        """Dense Frobenius norm of each linear."""
        return types.MappingProxyType(self._dense_norms)

    def _add_norms(self, norms: Mapping[str, Mapping[str, float]]) -> None:
        for lin, per in norms.items():
            for lv, v in per.items():
                self._norms[(lin, round(float(lv), _LEVEL_DIGITS))] = float(v)

    # -- sizes -----------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        """Bytes on disk now, by kind (variant data, calibration state, manifest) and in total."""
        out: dict[str, int] = {}
        for p in self.root.rglob("*"):
            if p.is_file():
                kind = self._kind_of(p.relative_to(self.root))
                out[kind] = out.get(kind, 0) + p.stat().st_size
        out["total"] = sum(out.values())
        return out

    def _kind_of(self, rel: Path) -> str:
        if rel.parts[0] == "calib":
            return "calibration"
        if rel.name == MANIFEST or rel.parts[0] == "locks":
            return "manifest"
        return "variants"
