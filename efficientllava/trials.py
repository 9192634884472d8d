"""Trial records and the trial table: one record per finished trial (written by the driver), one row each."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from efficientllava.atomic import write_json_atomic
from efficientllava.errors import DamagedFileError
from efficientllava.experiment import open_experiment
from efficientllava.search.api import (
    ATTRIBUTION_PREFIX,
    METRIC,
    POLICY_PREFIX,
    STATUSES,
    Objective,
    RoundState,
    TrialStatus,
)

# Leading columns, in order; result terms and policy/param columns follow.
BASE_COLUMNS = ("round", "number", "status", "objective")
META_COLUMNS = ("retry_of", "eval_s", "wall_s", "error", "trial_id", "worker", "started_at", "finished_at")
_TYPED = ("round", "number", "status", "retry_of", "error", "trial_id", "worker")


def trial_record(*, state: RoundState, number: int, trial_id: str, params: Mapping[str, Any],
                 result: Mapping[str, Any] | None, error: str | None, started: float, finished: float,
                 eval_s: float, retry_of: int | None, wall_s: float | None = None, worker: str | None = None,
                 traceback: str | None = None, seed: str | None = None) -> dict[str, Any]:
    """The record of one finished trial: what `trials/<round>-<number>.json` holds.

    `started`/`finished` bound the evaluation on its worker; `wall_s` is the trial's time from
    dispatch to result (queueing and transfer included; `finished - started` when not given).
    """
    result = dict(result or {})
    rec: dict[str, Any] = {
        "round": state.round,
        "number": number,
        "trial_id": trial_id,
        "status": (TrialStatus.COMPLETE if error is None else TrialStatus.ERROR).value,
        "error": error,
        "objective": result.get(METRIC) if error is None else None,
        "params": dict(params),
        "result": result,
        "state": dict(state.payload),
        "retry_of": retry_of,
        "seed": seed,
        "eval_s": eval_s,
        "wall_s": finished - started if wall_s is None else wall_s,
        "started_at": started,
        "finished_at": finished,
        "worker": worker,
        "driver_host": socket.gethostname(),
    }
    if traceback:
        rec["traceback"] = traceback[-4000:]
    return rec


def policy_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The policy a trial scored: its `policy/<unit>` result terms."""
    return {k[len(POLICY_PREFIX):]: v for k, v in (record.get("result") or {}).items() if k.startswith(POLICY_PREFIX)}


def read_record(path: str | Path) -> dict[str, Any]:
    """One trial record; a damaged one is a DamagedFileError naming the file and what to do."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        int(rec["round"]), int(rec["number"]), rec["status"], dict(rec["params"])
    except OSError as exc:
        raise DamagedFileError(path, f"cannot read trial record ({exc.strerror})", _record_todo(path)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedFileError(path, f"damaged trial record ({type(exc).__name__}: {str(exc)[:80]})",
                               _record_todo(path)) from None
    return rec


def _record_todo(path: Path) -> str:
    """What to do about a damaged record: it is the only copy of that trial's result."""
    return (f"restore it from a backup, or move it out of {path.parent} (that trial's terms are then lost; "
            f"the study still counts it, so it is not evaluated again)")


def read_records(experiment_dir: str | Path) -> list[dict[str, Any]]:
    """All trial records of an experiment, sorted by (round, number)."""
    exp = open_experiment(experiment_dir)
    records = [read_record(p) for p in exp.trial_paths()]
    return sorted(records, key=lambda r: (int(r["round"]), int(r["number"])))


def load_trials(experiment_dir: str | Path) -> pd.DataFrame:
    """The trial table of an experiment as a typed DataFrame, sorted by round and number.

    Columns: round, number (int64), status (category: COMPLETE | ERROR), objective and every other
    term the problem reported (float64, or Int64 when every value is an integer; NaN for errored
    trials), `policy/<unit>` (float64), `attribution/<unit>` (each unit's share of the KL, when the
    sampler asked for it), `param/<name>` (the sampled parameters), retry_of (Int64,
    <NA> if not a retry), eval_s, wall_s (float64), error (str or <NA>), trial_id, worker (the worker
    that evaluated it), started_at, finished_at (unix seconds).
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
    df["status"] = df["status"].astype(pd.CategoricalDtype(list(STATUSES)))
    df["retry_of"] = pd.to_numeric(df["retry_of"]).astype("Int64")
    for col in ("error", "trial_id", "worker"):
        df[col] = df[col].astype("string")
    for col in df.columns:
        if col in _TYPED:
            continue
        if (col.startswith("param/") or not col.startswith("policy/")) and col != METRIC and _integral(df[col]):
            df[col] = pd.to_numeric(df[col]).astype("Int64")  # level indices, counts and versions stay integers
        elif col.startswith("policy/") or _numeric(df[col]):
            df[col] = pd.to_numeric(df[col]).astype("float64")
    policy = sorted(c for c in df.columns if c.startswith(POLICY_PREFIX))
    params = sorted(c for c in df.columns if c.startswith("param/"))
    shares = sorted(c for c in df.columns if c.startswith(ATTRIBUTION_PREFIX))
    terms = [c for c in df.columns if c not in (*BASE_COLUMNS, *META_COLUMNS) and c not in policy + params + shares]
    df = df[[*BASE_COLUMNS, *terms, *policy, *shares, *params, *META_COLUMNS]]
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


def _finite(value: Any) -> bool:
    """True for a finite real number (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def completed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of trials that completed with a finite objective."""
    return [r for r in records if r.get("status") == TrialStatus.COMPLETE.value and _finite(r.get("objective"))]


def best_record(experiment_dir: str | Path) -> dict[str, Any] | None:
    """The completed trial with the highest objective over all rounds (ties: earliest), or None."""
    best = None
    for rec in completed(read_records(experiment_dir)):
        if best is None or rec["objective"] > best["objective"]:
            best = rec
    return best


def pareto_set(records: list[dict[str, Any]], objectives: Sequence[Objective]) -> list[dict[str, Any]]:
    """The completed records no other completed record dominates on `objectives` (ties: all kept)."""
    def key(rec: dict[str, Any]) -> tuple[float, ...] | None:
        values = []
        for o in objectives:
            v: Any = rec["objective"] if o.name == METRIC else (rec.get("result") or {}).get(o.name)
            if not _finite(v):
                return None
            values.append(float(v) if o.mode == "max" else -float(v))  # larger is better on every axis
        return tuple(values)

    points = [(rec, k) for rec in completed(records) if (k := key(rec)) is not None]
    return [rec for rec, k in points
            if not any(all(a >= b for a, b in zip(q, k, strict=True)) and q != k for _, q in points)]


def write_best_policy(experiment_dir: str | Path, objectives: Sequence[Objective] = ()) -> Path | None:
    """Write `best_policy.json`: the best trial's policy, round, objective, every term and its round state.

    With several `objectives` (a multi-objective search) it also lists the Pareto set as [round, number].
    """
    exp = open_experiment(experiment_dir)
    records = read_records(exp.root)
    rec = best_record(exp.root)
    if rec is None:
        return None
    terms = {k: v for k, v in rec["result"].items() if not k.startswith((POLICY_PREFIX, ATTRIBUTION_PREFIX))}
    out = {
        **terms,
        "policy": policy_of(rec),
        "round": rec["round"],
        "number": rec["number"],
        "objective": rec["objective"],
        "params": rec["params"],
        "state": rec.get("state", {}),
        "trial_id": rec["trial_id"],
    }
    if len(objectives) > 1:
        out["pareto"] = [[r["round"], r["number"]] for r in pareto_set(records, objectives)]
    write_json_atomic(exp.best_policy_path, out)
    return exp.best_policy_path


def overhead_summary(experiment_dir: str | Path) -> pd.DataFrame:
    """Per round: how much of the wall time went to the search machinery rather than `evaluate`.

    Columns: round, trials, workers (that evaluated trials), seconds (the round's wall time, summed
    over its (re)starts), mean_eval_s, slot_s (seconds one concurrency slot spent per trial),
    round_overhead (1 - eval/slot), cycle_s (steady state: seconds between consecutive evaluation
    ends on one worker), steady_overhead (1 - eval/cycle), startup_s (round start to its first
    evaluation's start: round set-up and Tune's trial start-up).
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
        by_worker: dict[Any, list[dict[str, Any]]] = {}
        for rec in sorted(recs, key=lambda x: x["started_at"]):
            by_worker.setdefault(rec.get("worker"), []).append(rec)
        pairs = [(b["finished_at"] - a["finished_at"], b["eval_s"])
                 for xs in by_worker.values() for a, b in zip(xs[:-1], xs[1:], strict=True)]
        cycle = sum(c for c, _ in pairs) / len(pairs) if pairs else math.nan
        cycle_eval = sum(e for _, e in pairs) / len(pairs) if pairs else math.nan
        slot = seconds * slots / len(recs)
        rows.append({
            "round": r, "trials": len(recs), "workers": len(by_worker), "seconds": seconds,
            "mean_eval_s": mean_eval, "slot_s": slot, "round_overhead": 1 - mean_eval / slot,
            "cycle_s": cycle, "steady_overhead": 1 - cycle_eval / cycle if pairs else math.nan,
            "startup_s": min(rec["started_at"] for rec in recs) - timings[0]["started_at"],
        })
    return pd.DataFrame(rows)


def run_overhead(experiment_dir: str | Path) -> dict[str, float]:
    """Whole-run figures over every driver run: wall seconds from the driver's start (worker start-up,
    every round and every round boundary included) to its end, evaluation seconds, and
    overhead = 1 - evaluation seconds / (wall seconds x max_concurrent)."""
    exp = open_experiment(experiment_dir)
    runs = [json.loads(p.read_text()) for p in sorted(exp.rounds_dir.glob("run-*.json"))]
    runs = [run for run in runs if run.get("finished_at")]
    records = read_records(exp.root)
    if not runs or not records:
        return {"seconds": math.nan, "eval_s": math.nan, "overhead": math.nan, "trials": len(records)}
    wall = sum(run["finished_at"] - run["started_at"] for run in runs)
    slots = int(runs[-1].get("max_concurrent", 1))
    evals = sum(rec["eval_s"] for rec in records)
    return {"seconds": wall, "eval_s": evals, "overhead": 1 - evals / (wall * slots), "trials": len(records),
            "max_concurrent": slots}
