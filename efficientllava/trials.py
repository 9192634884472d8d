"""The trial table: one row per finished trial, rebuilt from the trial JSONs (works mid-search)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from efficientllava.experiment import open_experiment, write_json_atomic

# Leading columns, in order; result terms and policy/param columns follow.
BASE_COLUMNS = ("round", "number", "status", "objective")
META_COLUMNS = ("projector_version", "retry_of", "eval_s", "wall_s", "error", "trial_id", "started_at", "finished_at")


def read_records(experiment_dir: str | Path) -> list[dict[str, Any]]:
    """All trial JSONs of an experiment, sorted by (round, number)."""
    exp = open_experiment(experiment_dir)
    records = [json.loads(p.read_text()) for p in exp.trial_paths()]
    return sorted(records, key=lambda r: (int(r["round"]), int(r["number"])))


def load_trials(experiment_dir: str | Path) -> pd.DataFrame:
    """The trial table of an experiment as a typed DataFrame, sorted by round and number.

    Columns: round, number (int64), status (category: COMPLETE | ERROR), objective and every other
    numeric term the problem reported (float64; NaN for errored trials), `policy/<unit>` (float64),
    `param/<name>` (the sampled parameters), projector_version, retry_of (Int64, <NA> if not a retry),
    eval_s, wall_s (float64), error (str or <NA>), trial_id, started_at, finished_at (unix seconds).
    """
    return records_to_frame(read_records(experiment_dir))


def records_to_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Build the typed trial table from trial records."""
    rows = []
    for rec in records:
        row: dict[str, Any] = {k: rec.get(k) for k in (*BASE_COLUMNS, *META_COLUMNS)}
        for k, v in (rec.get("result") or {}).items():
            if k not in row:
                row[k] = v
        for k, v in (rec.get("params") or {}).items():
            row[f"param/{k}"] = v
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else [*BASE_COLUMNS, *META_COLUMNS])
    for col in ("round", "number"):
        df[col] = df[col].astype("int64")
    df["status"] = df["status"].astype(pd.CategoricalDtype(["COMPLETE", "ERROR"]))
    df["retry_of"] = pd.to_numeric(df["retry_of"]).astype("Int64")
    df["projector_version"] = pd.to_numeric(df["projector_version"]).astype("Int64")
    df["error"] = df["error"].astype("string")
    df["trial_id"] = df["trial_id"].astype("string")
    for col in df.columns:
        if col in ("round", "number", "status", "retry_of", "projector_version", "error", "trial_id"):
            continue
        if col.startswith("param/") and _integral(df[col]):
            df[col] = pd.to_numeric(df[col]).astype("Int64")  # level indices stay integers
        elif col.startswith("policy/") or _numeric(df[col]):
            df[col] = pd.to_numeric(df[col]).astype("float64")
    policy = sorted(c for c in df.columns if c.startswith("policy/"))
    params = sorted(c for c in df.columns if c.startswith("param/"))
    terms = [c for c in df.columns if c not in (*BASE_COLUMNS, *META_COLUMNS) and c not in policy + params]
    df = df[[*BASE_COLUMNS, *terms, *policy, *params, *META_COLUMNS]]
    return df.sort_values(["round", "number"], kind="stable").reset_index(drop=True)


def _integral(s: pd.Series) -> bool:
    """True when every non-missing value is an integer (bools excluded)."""
    values = s.dropna()
    return len(values) > 0 and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _numeric(s: pd.Series) -> bool:
    """True when every non-missing value is a real number (bools excluded)."""
    values = s.dropna()
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def write_trials_parquet(experiment_dir: str | Path) -> Path:
    """Write `trials.parquet` (the table of `load_trials`) into the experiment directory."""
    exp = open_experiment(experiment_dir)
    df = load_trials(exp.root)
    tmp = exp.trials_parquet.with_suffix(".parquet.tmp")
    # Mixed-type leftover columns (e.g. a problem's string term) are stored as strings.
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(lambda v: None if v is None else str(v)).astype("string")
    df.to_parquet(tmp, index=False)
    tmp.replace(exp.trials_parquet)
    return exp.trials_parquet


def best_record(experiment_dir: str | Path) -> dict[str, Any] | None:
    """The finished trial with the highest objective over all rounds (ties: earliest), or None."""
    best = None
    for rec in read_records(experiment_dir):
        value = rec.get("objective")
        if rec.get("status") != "COMPLETE" or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if best is None or value > best["objective"]:
            best = rec
    return best


def write_best_policy(experiment_dir: str | Path) -> Path | None:
    """Write `best_policy.json`: the best trial's policy mapping, round, objective and every term."""
    exp = open_experiment(experiment_dir)
    rec = best_record(exp.root)
    if rec is None:
        return None
    terms = {k: v for k, v in rec["result"].items() if not k.startswith("policy/")}
    write_json_atomic(exp.best_policy_path, {
        **terms,
        "policy": rec["policy"],
        "round": rec["round"],
        "number": rec["number"],
        "objective": rec["objective"],
        "params": rec["params"],
        "projector_version": rec["projector_version"],
        "projector_path": rec.get("projector_path"),
        "space_path": rec.get("space_path"),
        "trial_id": rec["trial_id"],
    })
    return exp.best_policy_path


def overhead_summary(experiment_dir: str | Path) -> pd.DataFrame:
    """Per round: how much of the wall time went to Ray Tune rather than `evaluate` (from the JSONs on disk).

    Columns: round, trials, actors, seconds (the round's wall time, summed over its (re)starts),
    mean_eval_s, slot_s (seconds one concurrency slot spent per trial), round_overhead (1 - eval/slot),
    cycle_s (steady state: seconds between consecutive trial ends on one reused actor), steady_overhead
    (1 - eval/cycle), startup_s (round start to its first trial's start: actor start-up and setup).
    """
    exp = open_experiment(experiment_dir)
    records = read_records(exp.root)
    rows = []
    for r in sorted({int(rec["round"]) for rec in records}):
        timings = [json.loads(p.read_text()) for p in sorted(exp.round_dir(r).glob("timing-*.json"))]
        recs = [rec for rec in records if rec["round"] == r]
        if not timings or not recs:
            continue
        seconds = sum(t["seconds"] for t in timings)
        slots = int(timings[-1].get("max_concurrent", 1))
        mean_eval = sum(rec["eval_s"] for rec in recs) / len(recs)
        by_actor: dict[Any, list[dict[str, Any]]] = {}
        for rec in sorted(recs, key=lambda x: x["started_at"]):
            by_actor.setdefault((rec.get("host"), rec.get("pid"), rec.get("actor_started_at")), []).append(rec)
        pairs = [(b["finished_at"] - a["finished_at"], b["eval_s"])
                 for xs in by_actor.values() for a, b in zip(xs[:-1], xs[1:], strict=True)]
        cycle = sum(c for c, _ in pairs) / len(pairs) if pairs else math.nan
        cycle_eval = sum(e for _, e in pairs) / len(pairs) if pairs else math.nan
        slot = seconds * slots / len(recs)
        rows.append({
            "round": r, "trials": len(recs), "actors": len(by_actor), "seconds": seconds,
            "mean_eval_s": mean_eval, "slot_s": slot, "round_overhead": 1 - mean_eval / slot,
            "cycle_s": cycle, "steady_overhead": 1 - cycle_eval / cycle if pairs else math.nan,
            "startup_s": min(rec["started_at"] for rec in recs) - timings[0]["started_at"],
        })
    return pd.DataFrame(rows)
