"""Build, open and cache variant banks; the format follows the method (nested masks, or compact per level)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efficientllava.errors import PolicyError
from efficientllava.filelock import file_lock
from efficientllava.log import get_logger
from efficientllava.pruning.bank import compact, nested
from efficientllava.pruning.bank.base import (
    BankSpec,
    DamagedBankError,
    VariantBank,
    bank_bytes,
    bank_fingerprint,
    linear_weight,
    read_manifest,
    write_manifest,
)
from efficientllava.pruning.calibrate import collect_stats
from efficientllava.pruning.methods import NestedMethod
from efficientllava.pruning.patterns import Pattern
from efficientllava.pruning.units import PrunableUnit, prunable_units

HESSIAN_BYTES_PER_PASS = 2 << 30  # calibrate as many layers per forward pass as fit in this budget
FORMATS: dict[str, type[VariantBank]] = {nested.FORMAT: nested.NestedMaskBank, compact.FORMAT: compact.CompactBank}

logger = get_logger(__name__)


def bank_format(spec: BankSpec) -> tuple[str, int]:
    """(format, version) a spec's bank is stored in: nested masks for nesting methods, else compact."""
    if spec.pruning_method.nested:
        return nested.FORMAT, nested.VERSION
    return compact.FORMAT, compact.VERSION


def _dtype_name(model: nn.Module, units: Sequence[PrunableUnit]) -> str:
    dtypes = {linear_weight(model, n).dtype for u in units for n in u.linears}
    return ",".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def fingerprint_for(model: nn.Module, spec: BankSpec, source: str = "", calibration: str = "") -> str:
    """The fingerprint (and cache directory name) of `spec`'s bank for this model and calibration."""
    units = [u for u in prunable_units(model, spec.granularity) if u.name in dict(spec.unit_levels)]
    return bank_fingerprint(spec, *bank_format(spec), source, calibration, _dtype_name(model, units))


def _layer_groups(units: Sequence[PrunableUnit], model: nn.Module, need_h: bool) -> list[list[int]]:
    """Group decoder layers so one calibration pass keeps at most HESSIAN_BYTES_PER_PASS of Hessians."""
    layers = sorted({u.layer for u in units})
    if not need_h:
        return [layers]
    per_layer: dict[int, int] = {}
    for u in units:
        cols = [linear_weight(model, n).shape[1] for n in u.linears]
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


def build_bank(model: nn.Module, batches: list[dict[str, torch.Tensor]], spec: BankSpec, root: str | Path,
               calibration: str = "", log: bool = False, *, source: str = "", eager: bool = False) -> VariantBank:
    """Calibrate on `batches` and write `spec`'s bank to `root` atomically (replacing what is there).

    Nesting methods get a nested-mask bank (built whole: it is cheap); others a compact bank that
    stores calibration state and builds each variant on first request, or everything now if `eager`.
    """
    start = time.perf_counter()
    root = Path(root)
    method = spec.pruning_method
    pattern = Pattern.parse(spec.pattern)
    levels = dict(spec.unit_levels)
    units = [u for u in prunable_units(model, spec.granularity) if u.name in levels]
    unknown = sorted(set(levels) - {u.name for u in units})
    if unknown:
        raise PolicyError(f"bank spec names unit(s) {', '.join(unknown)} that the model does not have")
    fmt, version = bank_format(spec)
    dtype = _dtype_name(model, units)
    tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest: dict[str, Any] = {"format": fmt, "version": version, "spec": spec.as_dict(),
                    "fingerprint": bank_fingerprint(spec, fmt, version, source, calibration, dtype),
                    "source": source, "calibration": calibration, "dtype": dtype, "eager": eager,
                    "units": {u.name: list(u.linears) for u in units}, "unit_layer": {u.name: u.layer for u in units},
                    "shapes": {}, "dense_norms": {}, "norms": {}, "files": {}, "streams": {}, "calib_files": {}}
        need = method.stats
        for group in _layer_groups(units, model, need == "hessian"):
            group_units = [u for u in units if u.layer in group]
            names = [n for u in group_units for n in u.linears]
            stats = collect_stats(model, batches, names, need_hessian=need == "hessian") if need != "none" else {}
            unit_linears = {u.name: u.linears for u in group_units}
            if isinstance(method, NestedMethod):
                part = nested.build_nested(method, model, unit_linears, levels, pattern, stats, tmp)
            else:
                part = compact.build_compact(method, model, unit_linears, levels, manifest["unit_layer"], pattern,
                                             stats, tmp, eager)
                manifest["streams"].update(part["streams"])
                manifest["calib_files"].update(part["calib_files"])
            manifest["norms"].update(part["norms"])
            manifest["files"].update(part["files"])
            for name in names:
                weight = linear_weight(model, name)
                manifest["dense_norms"][name] = float(weight.float().norm())
                manifest["shapes"][name] = list(weight.shape)
            del stats
        manifest["build_seconds"] = round(time.perf_counter() - start, 3)
        write_manifest(tmp, manifest)  # written last: marks the bank complete
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        what = "all variants" if method.nested or eager else "calibration state (variants built on first use)"
        logger.info(f"bank: {spec.method} {spec.pattern} ({fmt}): {len(units)} units, {what} in "
                    f"{manifest['build_seconds']:.1f}s at {root} ({bank_bytes(root) / 2**20:.1f} MiB)")
    return open_bank(root)


def open_bank(root: str | Path, fingerprint: str | None = None) -> VariantBank:
    """Open a complete bank of any format; DamagedBankError if it is incomplete, damaged or another version."""
    root = Path(root)
    manifest = read_manifest(root)
    cls = FORMATS.get(manifest.get("format", ""))
    if cls is None or manifest.get("version") != cls.VERSION:
        raise DamagedBankError(f"{root}: bank format {manifest.get('format')!r} v{manifest.get('version')} is not "
                               f"one this version reads ({', '.join(f'{k} v{c.VERSION}' for k, c in FORMATS.items())})"
                               "; delete the bank and rebuild it")
    try:
        bank = cls(root, manifest)
        bank.validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise DamagedBankError(f"{root}: the bank manifest is malformed ({exc!r}); rebuild it") from None
    if fingerprint is not None and bank.fingerprint != fingerprint:
        raise DamagedBankError(f"{root}: bank fingerprint {bank.fingerprint} != {fingerprint}; rebuild it")
    return bank


def open_or_build(model: nn.Module, batches: list[dict[str, torch.Tensor]], spec: BankSpec, banks_dir: str | Path,
                  *, source: str = "", calibration: str = "", log: bool = False, eager: bool = False) -> VariantBank:
    """The cached bank for (spec, model, calibration) under `banks_dir`, built once by one process.

    The directory is named by the fingerprint; a file lock beside it lets several workers on a node
    ask at once (one builds, the others wait and open). A damaged bank is deleted and rebuilt.
    """
    fingerprint = fingerprint_for(model, spec, source, calibration)
    root = Path(banks_dir) / fingerprint
    with file_lock(root.with_suffix(".lock")):
        if root.exists():
            try:
                return open_bank(root, fingerprint)
            except DamagedBankError as exc:  # a cache: rebuilt, with one line whatever `log` says
                logger.warning(f"bank: rebuilding: {exc}")
                shutil.rmtree(root, ignore_errors=True)
        return build_bank(model, batches, spec, root, calibration, log, source=source, eager=eager)
