"""Records first: before a driver runs, make the directory's derived state agree with its trial records.

The trial JSONs (`trials/<r>-<n>.json`) are the record of what was evaluated. Everything else the
driver reads is rebuilt from them (and from the round files the problem wrote) when it is missing
or damaged, without evaluating anything again:
- the Optuna journal (`study.journal`): missing, unreadable (a garbled line), or missing trials that
  have records (cut short) -> moved aside as `study.journal.damaged-<stamp>` and rebuilt: one study per
  round, each record added as a finished trial (`study.add_trial(create_trial(...))`) with the
  engine's number, retry and seed tags, so reconciliation counts exactly the trials on disk;
- `state.json`: missing or damaged -> rebuilt from `rounds/round-<r>/state.json` (each round's
  RoundState, written when the round was set up) and the records' round payloads; the round loop
  then goes on from the last round set up (a finished round is not run again, and the problem's
  `after_round` reuses what it already wrote, e.g. a trained projector).
Each repair is one warning line. Runs under the driver lock only (it rewrites files).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from efficientllava.atomic import write_json_atomic
from efficientllava.errors import DamagedFileError
from efficientllava.experiment import STATUS_CREATED, STATUS_DONE, STATUS_RUNNING, ExperimentDir
from efficientllava.log import get_logger
from efficientllava.search.api import DriverContext, Objective, RoundState, SearchProblem, TrialStatus
from efficientllava.search.study import (
    ATTR_ERROR,
    ATTR_NUMBER,
    ATTR_RETRY_OF,
    ATTR_RETRY_REASON,
    ATTR_SEED,
    ATTR_TUNE_ID,
    distributions,
    open_study,
    record_values,
    study_name,
    trial_number,
)
from efficientllava.trials import read_records

log = get_logger(__name__)


def journal_damage(exp: ExperimentDir, records: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the journal cannot be trusted against `records` (None when it can)."""
    path = exp.journal_path
    if not path.is_file():
        return "is missing" if records else None
    line_no = 0
    try:
        with open(path, "rb") as fh:
            for line in fh:
                line_no += 1
                if line.endswith(b"\n"):  # a torn last line is dropped by repair_journal, not a damage
                    json.loads(line)
    except (OSError, ValueError) as exc:
        return f"is unreadable (line {line_no}: {type(exc).__name__})"
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for rec in records:
        by_round.setdefault(int(rec["round"]), []).append(rec)
    try:
        storage = exp.storage()
        studies = {s.study_name: s._study_id for s in storage.get_all_studies()}
        for r, recs in sorted(by_round.items()):
            if study_name(r) not in studies:
                return f"has no study for round {r}"
            numbers = {trial_number(t): t for t in storage.get_all_trials(studies[study_name(r)], deepcopy=False)}
            for rec in recs:
                t = numbers.get(int(rec["number"]))
                if t is None:
                    return f"lacks trial {r}-{rec['number']}"
                if t.params and dict(t.params) != dict(rec["params"]):
                    return f"disagrees with the record of trial {r}-{rec['number']}"
    except Exception as exc:  # noqa: BLE001 (any failure to read it means: rebuild it)
        return f"is unreadable ({type(exc).__name__}: {str(exc)[:80]})"
    return None


def _round_distributions(problem: SearchProblem, r: int, recs: Sequence[Mapping[str, Any]],
                         ctx: DriverContext) -> dict[str, IntDistribution]:
    """Round r's Optuna distributions: the problem's space for the round, widened to cover every record."""
    try:
        dists = distributions(problem.space(RoundState(r, recs[0].get("state") or {}), ctx))
    except Exception:  # noqa: BLE001 (a round file gone too: the records' own ranges still rebuild the study)
        dists = {}
    for rec in recs:
        for name, v in rec["params"].items():
            d = dists.get(name)
            lo, hi = (int(v), int(v)) if d is None else (min(d.low, int(v)), max(d.high, int(v)))
            dists[name] = IntDistribution(lo, hi)
    return dists


def rebuild_journal(exp: ExperimentDir, problem: SearchProblem, objectives: Sequence[Objective],
                    records: Sequence[Mapping[str, Any]], ctx: DriverContext) -> Path | None:
    """Replace the journal by one rebuilt from `records`; returns where the old one was moved (if any)."""
    moved = None
    if exp.journal_path.exists():
        moved = exp.journal_path.with_name(f"{exp.journal_path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(exp.journal_path, moved)
    storage = exp.storage()
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for rec in records:
        by_round.setdefault(int(rec["round"]), []).append(rec)
    for r, recs in sorted(by_round.items()):
        recs = sorted(recs, key=lambda x: int(x["number"]))
        study = open_study(exp, r, objectives, storage=storage)
        dists = _round_distributions(problem, r, recs, ctx)
        status_of = {int(x["number"]): x.get("status") for x in recs}
        for rec in recs:
            attrs: dict[str, Any] = {ATTR_NUMBER: int(rec["number"])}
            if rec.get("trial_id"):
                attrs[ATTR_TUNE_ID] = rec["trial_id"]
            if rec.get("seed") is not None:
                attrs[ATTR_SEED] = rec["seed"]
            if rec.get("retry_of") is not None:
                attrs[ATTR_RETRY_OF] = int(rec["retry_of"])
                errored = status_of.get(int(rec["retry_of"])) == TrialStatus.ERROR.value
                attrs[ATTR_RETRY_REASON] = "error" if errored else "interrupted"
            params = {k: int(v) for k, v in rec["params"].items()}
            trial_dists: dict[str, BaseDistribution] = {k: dists[k] for k in params}
            values = record_values(rec, objectives) if rec.get("status") == TrialStatus.COMPLETE.value else None
            if values is not None:
                trial = create_trial(state=TrialState.COMPLETE, values=values, params=params,
                                     distributions=trial_dists, user_attrs=attrs)
            else:
                attrs[ATTR_ERROR] = str(rec.get("error"))[:500]
                trial = create_trial(state=TrialState.FAIL, params=params, distributions=trial_dists, user_attrs=attrs)
            study.add_trial(trial)
    return moved


def _round_state_files(exp: ExperimentDir) -> dict[int, RoundState]:
    """Each round's RoundState from `rounds/round-<r>/state.json` (unreadable ones skipped)."""
    out = {}
    for p in exp.rounds_dir.glob("round-*/state.json"):
        try:
            s = RoundState.from_json(json.loads(p.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning(f"{p}: unreadable, ignored")
            continue
        out[s.round] = s
    return out


def rebuild_state(exp: ExperimentDir, records: Sequence[Mapping[str, Any]]) -> str:
    """Rewrite state.json from the round files and records; returns a short description of what it holds."""
    states = _round_state_files(exp)
    for rec in records:
        if int(rec["round"]) not in states and isinstance(rec.get("state"), dict):
            states[int(rec["round"])] = RoundState(int(rec["round"]), rec["state"])
    if not states:
        exp.write_state(STATUS_CREATED, None, [])
        return "no round set up yet"
    last = max(states)
    gaps = [r for r in range(last) if r not in states]
    if gaps:
        raise DamagedFileError(exp.state_path, f"missing or damaged, and round {gaps[0]}'s state cannot be rebuilt "
                               f"(no rounds/round-{gaps[0]}/state.json and no trial record of it)",
                               "restore state.json from a backup")
    exp.write_state(STATUS_RUNNING, states[last], [states[r] for r in range(last)])
    done = "round 0" if last == 1 else f"rounds 0-{last - 1}"
    return f"{done} finished, round {last} current" if last else "round 0 current"


def heal_experiment(exp: ExperimentDir, problem: SearchProblem, objectives: Sequence[Objective],
                    ctx: DriverContext) -> list[str]:
    """Rebuild a damaged or missing state.json and journal from the records; returns the repairs made."""
    repairs = []
    records = read_records(exp.root)  # a damaged record is a one-line error: it is the record
    try:
        exp.read_state()
    except DamagedFileError as exc:
        damaged = exp.state_path.with_name(f"state.json.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(exp.state_path, damaged)
        repairs.append(f"{exp.state_path}: {str(exc).split(';')[0].split(': ', 1)[-1]}; moved to {damaged.name} "
                       f"and rebuilt ({rebuild_state(exp, records)})")
    else:
        if not exp.state_path.is_file() and (records or exp.round_state_path(0).is_file()):
            repairs.append(f"{exp.state_path}: missing; rebuilt from the round files and trial records "
                           f"({rebuild_state(exp, records)})")
    why = journal_damage(exp, records)
    if why is not None:
        moved = rebuild_journal(exp, problem, objectives, records, ctx)
        repairs.append(f"{exp.journal_path} {why}; rebuilt from {len(records)} trial records (nothing re-evaluated)"
                       + (f"; the old one is {moved.name}" if moved else ""))
    else:
        repairs += _records_missing(exp, records)
    repairs += _round_files(exp)
    for line in repairs:
        log.warning(line)
    _check_round_readable(exp, problem, ctx)
    return repairs


def _round_files(exp: ExperimentDir) -> list[str]:
    """Rewrite missing or damaged `rounds/round-<r>/state.json` from state.json (their other copy)."""
    saved = exp.read_state()
    states = [RoundState.from_json(h) for h in saved.get("history", [])]
    if saved.get("state"):
        states.append(RoundState.from_json(saved["state"]))
    fixed = []
    for s in {s.round: s for s in states}.values():
        path = exp.round_state_path(s.round)
        try:
            ok = RoundState.from_json(json.loads(path.read_text())) == s
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            write_json_atomic(path, s.to_json())
            fixed.append(s.round)
    return [f"{exp.rounds_dir}: rewrote the round state files of rounds {fixed} from state.json"] if fixed else []


def _check_round_readable(exp: ExperimentDir, problem: SearchProblem, ctx: DriverContext) -> None:
    """Fail before Ray when the current round's own files (its space, seeds) cannot be read."""
    if exp.read_state().get("status") == STATUS_DONE:
        return  # a finished search only rewrites its outputs from the records
    state = exp.round_state()
    if state is None:
        check = getattr(type(problem), "check_config", None)
        if callable(check):
            check(getattr(problem, "config", None))  # round 0 is still to be set up from the configured space
        return
    try:
        problem.space(state, ctx)
        problem.seed_points(state, ctx)
    except Exception as exc:  # noqa: BLE001 (any failure here would otherwise surface after Ray starts)
        files = ", ".join(str(exp.root / v) for v in state.payload.values()
                          if isinstance(v, str) and (exp.root / v).suffix in (".yaml", ".json"))
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise DamagedFileError(files or exp.root, f"round {state.round}'s files cannot be read ({first})",
                               "restore them from a backup or a copy of this directory, then run the command "
                               "again") from None


def _records_missing(exp: ExperimentDir, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per finished trial the study has but whose record is gone (not re-evaluated; its terms are lost)."""
    have = {(int(r["round"]), int(r["number"])) for r in records}
    lines: list[str] = []
    if not exp.journal_path.is_file():
        return lines
    storage = exp.storage()
    for s in storage.get_all_studies():
        if not s.study_name.startswith("round-"):
            continue
        r = int(s.study_name.split("-", 1)[1])
        trials = storage.get_all_trials(s._study_id, deepcopy=False)
        gone = sorted(n for t in trials if t.state == TrialState.COMPLETE
                      and (n := trial_number(t)) is not None and (r, n) not in have)
        if gone:
            lines.append(f"{exp.trials_dir}: the records of round {r}'s finished trials {gone} are missing; "
                         "the study keeps them (not evaluated again) but their terms are gone from the table")
    return lines
