"""The experiment report: PNG plots and a self-contained report.html, rebuilt from the trial table (works mid-search)."""

from __future__ import annotations

import html
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg explicitly: headless, no pyplot state
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from efficientllava.errors import ConfigError
from efficientllava.experiment import open_experiment
from efficientllava.pruning.units import is_unit, parse_unit, sort_units
from efficientllava.scoring import METRIC_LABELS
from efficientllava.search.api import METRIC, SIZE_METRIC, TrialStatus
from efficientllava.trials import load_trials

COMPLETE, ERROR = TrialStatus.COMPLETE.value, TrialStatus.ERROR.value

OBJECTIVE_PNG, PARETO_PNG, SPARSITY_PNG = "objective.png", "pareto.png", "sparsity.png"
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}th,td{padding:.25em .7em;text-align:right}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;border:1px solid #eee}
.note{background:#fff6d5;border:1px solid #e8d48a;padding:.6em 1em}.meta{color:#666}"""


def unit_order(units: list[str]) -> list[str]:
    """Units in model order (by layer; attention before MLP; q, k, v, o, gate, up, down), other names after."""
    return sort_units(units)


def pareto_front(df: pd.DataFrame, x: str = "kept_fraction", y: str = "accuracy") -> pd.DataFrame:
    """Rows not dominated when maximising `y` and minimising `x` (NaNs dropped; of equal points the first), by x."""
    pts = df[[x, y]].apply(pd.to_numeric, errors="coerce").dropna()
    pts = pts.sort_values([x, y], ascending=[True, False], kind="stable")
    keep, best_y = [], -math.inf
    for idx, yv in zip(pts.index, pts[y], strict=True):
        if yv > best_y:  # every earlier point has x' <= x, so this one survives only with a strictly better y
            keep.append(idx)
            best_y = yv
    return df.loc[keep]


def _projector_losses(experiment_dir: str | Path | None) -> dict[int, dict[str, float]]:
    """{version: {"loss_before", "loss_after"}} from projector/projector-<v>.json (unreadable files skipped)."""
    out: dict[int, dict[str, float]] = {}
    folder = Path(experiment_dir) / "projector" if experiment_dir is not None else None
    for p in sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []:
        try:
            d = json.loads(p.read_text())
            out[int(d["version"])] = {k: float(d[k]) for k in ("loss_before", "loss_after")}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-written or foreign file must not break a report
    return out


def _completed(df: pd.DataFrame) -> pd.DataFrame:
    """Completed trials with a finite objective."""
    ok = df[df["status"] == COMPLETE]
    return ok[np.isfinite(pd.to_numeric(ok["objective"], errors="coerce").to_numpy(dtype=float))]


def _best_row(df: pd.DataFrame) -> pd.Series | None:
    """The completed trial with the highest objective (ties: earliest), or None."""
    ok = _completed(df)
    return None if ok.empty else ok.loc[ok["objective"].astype(float).idxmax()]


def round_summary(df: pd.DataFrame, experiment_dir: str | Path | None = None) -> pd.DataFrame:
    """Per round: trial counts, the best trial's objective/accuracy/gap/kept fraction, projector version and loss.

    The projector columns describe the projector the round's trials ran with (version 0 = the checkpoint's own,
    which has no training loss); its loss before/after training comes from projector/projector-<v>.json.
    """
    losses = _projector_losses(experiment_dir)
    rows = []
    for r, g in df.groupby("round", sort=True):
        best = _best_row(g)
        versions = g["projector_version"].dropna() if "projector_version" in g else pd.Series([], dtype="Int64")
        version = int(versions.iloc[-1]) if len(versions) else None
        loss = losses.get(version, {}) if version is not None else {}
        rows.append({
            "round": int(r), "trials": len(g), "completed": int((g["status"] == COMPLETE).sum()),
            "errored": int((g["status"] == ERROR).sum()),
            **{c: _num(best.get(c)) if best is not None else math.nan
               for c in ("objective", "accuracy", "gap", "kept_fraction")},
            "projector_version": version,
            "projector_loss_before": loss.get("loss_before", math.nan),
            "projector_loss_after": loss.get("loss_after", math.nan),
        })
    cols = ["round", "trials", "completed", "errored", "objective", "accuracy", "gap", "kept_fraction",
            "projector_version", "projector_loss_before", "projector_loss_after"]
    out = pd.DataFrame(rows, columns=cols).rename(columns={"objective": "best_objective"})
    return out.astype({"projector_version": "Int64"})


def _num(v: Any) -> float:
    """A float for a table cell (NaN for missing or non-numeric values)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _save(fig: Figure, path: Path) -> str:
    """Render `fig` with the Agg canvas to `path`; returns the file name (the HTML's relative reference)."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path.name


def _plot_objective(df: pd.DataFrame, path: Path) -> str:
    """Objective per trial in (round, number) order, colour per round, running best, errors on the x-axis."""
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    seq = pd.Series(range(1, len(df) + 1), index=df.index)
    ok = _completed(df)
    for i, (r, g) in enumerate(ok.groupby("round", sort=True)):
        ax.scatter(seq[g.index], g["objective"], s=18, color=f"C{i % 10}", label=f"round {r}")
    ax.step(seq[ok.index], ok["objective"].astype(float).cummax(), where="post", color="k", lw=1.2,
            label="running best")
    err = df[df["status"] == ERROR]
    if len(err):  # on the x-axis itself: errored trials have no objective
        ax.scatter(seq[err.index], [0.0] * len(err), marker="x", color="red", clip_on=False, zorder=5,
                   transform=blended_transform_factory(ax.transData, ax.transAxes), label="error")
    for b in df.index[df["round"].diff().fillna(0) != 0]:
        ax.axvline(seq[b] - 0.5, color="#bbb", ls=":", lw=1)
    ax.set(xlabel="trial (all rounds, in order)", ylabel="objective", title="Objective per trial")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never hides points
    return _save(fig, path)


def _plot_pareto(ok: pd.DataFrame, best: pd.Series, path: Path, y: str = "accuracy") -> str:
    """`y` (few-shot accuracy, or the objective of a two-objective search) vs kept fraction of completed
    trials, their Pareto front and the best trial."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for i, (r, g) in enumerate(ok.groupby("round", sort=True)):
        ax.scatter(g["kept_fraction"], g[y], s=18, alpha=.7, color=f"C{i % 10}", label=f"round {r}")
    front = pareto_front(ok, y=y)
    ax.step(front["kept_fraction"], front[y], where="post", color="k", lw=1.2, marker="o", ms=3,
            label="Pareto front")
    ax.scatter([best["kept_fraction"]], [best[y]], marker="*", s=220, color="gold", edgecolor="k",
               zorder=5, label=f"best objective (r{best['round']} #{best['number']})")
    label = "few-shot accuracy" if y == "accuracy" else y
    ax.set(xlabel="kept fraction (lower = more pruned)", ylabel=label, title=f"{label.capitalize()} vs size")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never hides points
    return _save(fig, path)


def _plot_sparsity(best: pd.Series, path: Path) -> str:
    """The best policy's per-unit sparsity chart (see `sparsity_figure`), saved to `path`."""
    return _save(sparsity_figure(best), path)


def sparsity_figure(best: pd.Series) -> Figure:
    """Bar chart of the best policy's per-unit sparsity in model order, grouped by decoder layer.

    One bar per unit, coloured by its part (attention / MLP, or q .. down at matrix granularity),
    with a gap between layers and one tick per layer, so 224 matrices of a 7B model stay readable.
    """
    units = unit_order([c.split("/", 1)[1] for c in best.index if c.startswith("policy/") and pd.notna(best[c])])
    parsed = [parse_unit(u) if is_unit(u) else (-1, "other") for u in units]
    parts = list(dict.fromkeys(part for _, part in parsed))
    grouped = len(parts) > 1 or parts != ["all"]  # several bars per layer: leave a gap between layers
    xs, ticks, x, prev = [], {}, 0.0, None
    for layer, _ in parsed:
        if grouped and prev is not None and layer != prev:
            x += 1.0
        xs.append(x)
        ticks.setdefault(layer, []).append(x)
        prev, x = layer, x + 1.0
    palette = {p: f"C{i % 10}" for i, p in enumerate(parts)}
    fig = Figure(figsize=(min(24.0, max(6.0, 0.055 * x + 2)), 3.8))
    ax = fig.add_subplot()
    for part in parts:
        idx = [i for i, (_, p) in enumerate(parsed) if p == part]
        ax.bar([xs[i] for i in idx], [float(best[f"policy/{units[i]}"]) for i in idx], width=0.9,
               color=palette[part], label=part)
    if grouped:
        centres = {layer: sum(v) / len(v) for layer, v in ticks.items() if layer >= 0}
        every = max(1, len(centres) // 40)  # at most ~40 layer labels
        shown = [layer for i, layer in enumerate(centres) if i % every == 0]
        ax.set_xticks([centres[layer] for layer in shown], [str(layer) for layer in shown], fontsize=7)
        ax.set_xlabel("decoder layer")
        ax.legend(fontsize=7, ncol=len(parts), loc="upper left", bbox_to_anchor=(0, -0.18), frameon=False)
    else:
        ax.set_xticks(xs, units, rotation=90, fontsize=7)
    ax.set_xlim(-1, x)
    ax.set(ylabel="sparsity", ylim=(0, 1),
           title=f"Best policy (round {best['round']}, trial {best['number']}): sparsity per unit")
    return fig


def _table(df: pd.DataFrame, index: bool = False) -> str:
    """An HTML table with compact numbers (escaped)."""
    return df.to_html(index=index, na_rep="–", border=0, float_format=lambda v: f"{v:.4g}", escape=True)


def _best_terms(best: pd.Series) -> pd.DataFrame:
    """The best trial's terms and provenance as a two-column table (missing values left out)."""
    skip = {"status", "error", "started_at", "finished_at"}
    keys = [k for k in best.index if not k.startswith(("policy/", "param/")) and k not in skip]
    rows = [(k, _cell(best[k])) for k in keys if not _missing(best[k])]
    return pd.DataFrame(rows, columns=["term", "value"])


def _missing(v: Any) -> bool:
    """True for None, NA and NaN."""
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _cell(v: Any) -> str:
    """A scalar as table text."""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _two_objective(root: Path) -> bool:
    """Whether the search ran a multi-objective sampler (best_policy.json then lists its Pareto set)."""
    best = root / "best_policy.json"
    try:
        return "pareto" in json.loads(best.read_text())
    except (OSError, ValueError):
        return False


def _heldout_table(heldout: dict[str, Any]) -> pd.DataFrame:
    """Rows = compared policies, columns = their held-out figures."""
    if not isinstance(heldout, dict) or not all(isinstance(v, dict) for v in heldout.values()):
        raise ConfigError("write_report(heldout=...): expected {name: {figure: number}}, e.g. "
                          "{'best': {'accuracy': 0.61, 'kept_fraction': 0.5}}")
    return pd.DataFrame.from_dict(heldout, orient="index").rename_axis("policy").reset_index()


def _heldout_caption(heldout: dict[str, Any]) -> str:
    """What the held-out figure is (unlabelled data: agreement with the dense model, not accuracy)."""
    metrics = {row.get("metric", "accuracy") for row in heldout.values()}
    label = ", ".join(METRIC_LABELS.get(m, m) for m in sorted(metrics))
    note = {"agreement": " (unlabelled data: the share of answers equal to the dense model's, not accuracy)",
            "exact_match": " (greedy answers after VQA normalisation)",
            "vqa_accuracy": " (greedy answers; min(#annotators agreeing / 3, 1))"}
    return f"<p class=meta>held-out figure: {html.escape(label)}" + "".join(
        html.escape(note[m]) for m in sorted(metrics) if m in note) + "</p>"


def write_report(experiment_dir: str | Path, heldout: dict[str, Any] | None = None) -> Path:
    """Write `<dir>/report/` (objective, Pareto and sparsity PNGs + report.html); returns the HTML path."""
    exp = open_experiment(experiment_dir)
    held = _heldout_table(heldout) if heldout is not None else None  # validate before any work
    out = exp.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    df = load_trials(exp.root)
    ok, best = _completed(df), _best_row(df)
    state = exp.read_state()
    two_objective = _two_objective(exp.root)
    e = html.escape
    parts = [f"<h1>EfficientLLaVA report — {e(exp.name)}</h1>",
             f"<p class=meta>status {e(str(state.get('status')))}, round {e(str(state.get('round')))}; "
             f"{len(df)} trials ({len(ok)} completed, {int((df['status'] == ERROR).sum())} errored); "
             f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    if best is None:
        parts.append("<p class=note>No completed trials yet: plots appear once a trial has finished.</p>")
    else:
        parts += ["<h2>Objective per trial</h2>", f'<img src="{_plot_objective(df, out / OBJECTIVE_PNG)}" '
                  'alt="objective per trial">']
        if two_objective and SIZE_METRIC in ok.columns and len(pareto_front(ok, y=METRIC)):
            front = pareto_front(ok, y=METRIC)
            parts += ["<h2>Objective vs kept fraction: the searched Pareto set</h2>",
                      f'<img src="{_plot_pareto(ok, best, out / PARETO_PNG, y=METRIC)}" alt="objective vs kept fraction">',
                      _table(front[[c for c in ("round", "number", METRIC, SIZE_METRIC, "accuracy") if c in front]])]
        elif {"accuracy", "kept_fraction"} <= set(ok.columns) and len(pareto_front(ok)):
            parts += ["<h2>Accuracy vs kept fraction</h2>",
                      f'<img src="{_plot_pareto(ok, best, out / PARETO_PNG)}" alt="accuracy vs kept fraction">']
        if any(c.startswith("policy/") and pd.notna(best[c]) for c in best.index):
            parts += ["<h2>Best policy: sparsity per unit</h2>",
                      f'<img src="{_plot_sparsity(best, out / SPARSITY_PNG)}" alt="sparsity per unit">']
    parts += ["<h2>Rounds</h2>", _table(round_summary(df, exp.root)) if len(df) else "<p>No trials yet.</p>"]
    if best is not None:
        parts += ["<h2>Best policy</h2>", _table(_best_terms(best))]
    if held is not None:
        parts += ["<h2>Held-out comparison</h2>", _heldout_caption(heldout or {}), _table(held)]
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{e(exp.name)} report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page)
    os.replace(tmp, path)  # a browser refreshing mid-search never sees half a page
    return path
