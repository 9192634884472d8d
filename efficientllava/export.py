"""Export a pruning policy as a plain Hugging Face checkpoint that `from_pretrained` loads.

Pruned weights are stored as zeros in ordinary dense safetensors (no custom classes, no masks),
with the processor, the prompt-format metadata (`efficientllava.json`) when the source had it,
`policy.json` and `export.json` (per-unit sparsity measured from the written files).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from efficientllava.errors import ConfigError
from efficientllava.families import ModelFamily, family_for
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.materialize import Materializer

META_FILE = "efficientllava.json"  # prompt format, read by models.loading.load_model
POLICY_FILE = "policy.json"
EXPORT_FILE = "export.json"
EXPORT_FORMAT = 1


def _zeros(weight: torch.Tensor) -> tuple[int, int]:
    """(zero entries, all entries) of one weight."""
    return int((weight == 0).sum()), weight.numel()


def _fractions(counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    return {u: zeros / total if total else 0.0 for u, (zeros, total) in counts.items()}


def measured_sparsity(model: nn.Module, unit_linears: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Fraction of exactly-zero weights of each unit's linear modules in `model` (module names as in the bank)."""
    counts = {}
    for unit, names in unit_linears.items():
        per = [_zeros(model.get_submodule(n).weight.detach()) for n in names]
        counts[unit] = (sum(z for z, _ in per), sum(t for _, t in per))
    return _fractions(counts)


def checkpoint_family(checkpoint: str | Path) -> ModelFamily:
    """The model family of a saved checkpoint, from its config.json."""
    config = Path(checkpoint) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{config}: cannot read the checkpoint's model_type ({exc})") from None
    return family_for(model_type)


def saved_sparsity(
    checkpoint: str | Path, unit_linears: Mapping[str, Sequence[str]]
) -> tuple[dict[str, float], float]:
    """Per-unit zero fraction read from a checkpoint's safetensors, and the parameter-weighted mean."""
    family = checkpoint_family(checkpoint)
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"{checkpoint} holds no .safetensors weights; export writes them with save_pretrained"
        )
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            where.update({k: path for k in fh.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    keys = set(where)
    counts = {}
    for unit, names in unit_linears.items():
        zeros = total = 0
        for name in names:
            key = family.checkpoint_key(name, keys)
            with safe_open(str(where[key]), framework="pt", device="cpu") as fh:
                z, t = _zeros(fh.get_tensor(key))
            zeros, total = zeros + z, total + t
        counts[unit] = (zeros, total)
    all_zeros, all_total = sum(z for z, _ in counts.values()), sum(t for _, t in counts.values())
    return _fractions(counts), (all_zeros / all_total if all_total else 0.0)


def _prepare(out_dir: Path) -> Path:
    """A fresh staging directory beside `out_dir`; refuse to replace a directory that is not an export."""
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / EXPORT_FILE).is_file())
    ):
        raise ConfigError(
            f"export target {out_dir} exists and is not an earlier export; choose a new or empty directory"
        )
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def export_policy(
    model: nn.Module,
    processor: Any,
    materializer: Materializer,
    policy: PruningPolicy,
    out_dir: str | Path,
    *,
    source_meta: Mapping[str, Any] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` carrying `policy` to `out_dir` as an HF checkpoint (+ policy/export JSON); returns out_dir.

    The model's dense weights are restored afterwards. The directory appears complete or not at
    all (written beside it, then renamed); an earlier export there is replaced.
    """
    out_dir = Path(out_dir).resolve()  # "." or "pruned/" still get a sibling staging directory
    try:
        extra = json.loads(json.dumps(dict(extra_meta or {})))
        meta = json.loads(json.dumps(dict(source_meta))) if source_meta is not None else None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"export metadata is not JSON-serialisable: {exc}") from None
    staging = _prepare(out_dir)
    try:
        with materializer.applied(policy):
            model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if meta is not None:
            (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        policy.save(staging / POLICY_FILE)
        unit_linears = materializer.bank.unit_linears
        per_unit, mean = saved_sparsity(staging, unit_linears)
        record = {
            "format": EXPORT_FORMAT,
            "policy_key": policy.key,
            "bank": materializer.bank.manifest.get("spec", {}),
            "units": {
                u: {"policy": policy.as_dict().get(u, 0.0), "measured": per_unit[u]} for u in unit_linears
            },
            "mean_sparsity": mean,
            "extra": extra,
        }
        (staging / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def export_experiment(experiment_dir: str | Path, out_dir: str | Path, trial: str | None = None) -> Path:
    """Export the best trial (or trial `ROUND-NUMBER`) of an experiment as an HF checkpoint + policy.json."""
    from efficientllava.experiment import open_experiment
    from efficientllava.problem import open_trial_session
    from efficientllava.search.api import TrialStatus
    from efficientllava.trials import best_record, policy_of, read_records

    exp = open_experiment(experiment_dir)
    exp.check_format()
    cfg = exp.load_config()
    if trial is None:
        rec = best_record(exp.root)
        if rec is None:
            raise ConfigError(f"{exp.root}: no completed trial to export yet")
    else:
        try:
            r, n = (int(x) for x in trial.split("-"))
        except ValueError:
            raise ConfigError(f"--trial {trial!r}: expected ROUND-NUMBER, e.g. 0-12") from None
        matches = [x for x in read_records(exp.root) if (x["round"], x["number"]) == (r, n)]
        if not matches or matches[0]["status"] != TrialStatus.COMPLETE.value:
            raise ConfigError(f"{exp.root}: no completed trial {trial}; see `efficientllava trials {exp.root}`")
        rec = matches[0]
    session = open_trial_session(cfg, exp.root, rec)  # the trial's projector and bank, in this process
    pipeline = session.pipeline
    assert session.scorer is not None
    meta_file = Path(pipeline.loaded.path) / "efficientllava.json"
    source_meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    return export_policy(pipeline.model, pipeline.loaded.processor, session.scorer.materializer,
                         PruningPolicy.from_mapping(policy_of(rec)), Path(out_dir), source_meta=source_meta,
                         extra_meta={"experiment": str(exp.root), "round": rec["round"], "number": rec["number"],
                                     "objective": rec["objective"], "model": cfg.model.spec,
                                     "projector_version": rec["result"].get("projector_version")})
