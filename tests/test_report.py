"""The experiment report: Pareto front, unit order, round summary and the written PNGs + HTML."""

from __future__ import annotations

import json
import math
import re
import time

import pandas as pd
import pytest

from efficientllava.config import config_from_dict
from efficientllava.errors import ConfigError
from efficientllava.experiment import create_experiment, write_json_atomic
from efficientllava.report import pareto_front, round_summary, unit_order, write_report
from efficientllava.search.api import RoundState
from efficientllava.trials import load_trials, trial_record

UNITS = [f"layer.{i}.{p}" for i in range(12) for p in ("attn", "mlp")]


def _result(acc: float, kept: float, sparsity: float, projector_version: int = 0) -> dict:
    """A result shaped like PruningProblem.evaluate's (TrialScore terms + policy + provenance)."""
    return {"objective": acc - 0.1, "accuracy": acc, "gap": 0.1, "capacity": 0.9, "lam": 1.0,
            "mean_sparsity": 1 - kept, "kept_fraction": kept, "within_budget": True, "budget_penalty": 0.0,
            "flops_per_sample": 1e9, "flops_speedup": 1 / kept, "n_samples": 16, "eval_s": 0.5,
            "latency_s": None, **{f"policy/{u}": sparsity for u in UNITS}, "policy_key": "k", "repaired": False,
            "projector_version": projector_version, "bank": "b", "fewshot": "f"}


def _experiment(tmp_path, trials: list[tuple[int, int, dict | None]], projector: bool = True):
    """An experiment dir with trial records written as the driver writes them: (round, number, result|None=error)."""
    exp = create_experiment(config_from_dict({"name": "t", "space": "s.yaml"}, resolve_space=False), tmp_path / "e")
    for r, n, result in trials:
        state = RoundState(r, {"space": f"spaces/round-{r}.yaml", "projector_version": r})
        now = time.time()
        rec = trial_record(state=state, number=n, trial_id=f"{r}-{n}", params={"layer.0.attn": 1}, result=result,
                           error=None if result else "RuntimeError: boom", started=now, finished=now + 0.1,
                           eval_s=0.1, retry_of=None)
        write_json_atomic(exp.trial_path(r, n), rec)
    if projector:
        (exp.root / "projector").mkdir(exist_ok=True)
        (exp.root / "projector" / "projector-1.json").write_text(json.dumps({"version": 1, "loss_before": 2.0,
                                                                              "loss_after": 1.5}))
    return exp


def test_pareto_front_keeps_only_non_dominated_points() -> None:
    df = pd.DataFrame({"kept_fraction": [0.5, 0.4, 0.6, 0.4, 0.8, 0.3, 0.7, math.nan],
                       "accuracy": [0.7, 0.6, 0.65, 0.6, 0.9, 0.2, 0.9, 1.0]},
                      index=list("abcdefgh"))
    front = pareto_front(df)
    # c is dominated by a; d duplicates b (one kept); g ties e on accuracy at a smaller x; h has no x.
    assert list(front.index) == ["f", "b", "a", "g"]
    assert front["kept_fraction"].is_monotonic_increasing and front["accuracy"].is_monotonic_increasing
    assert pareto_front(df.iloc[:0]).empty


def test_unit_order_is_numeric_attn_before_mlp() -> None:
    names = ["layer.10.mlp", "layer.2.mlp", "layer.10.attn", "layer.2.attn", "layer.1.attn", "other"]
    assert unit_order(names) == ["layer.1.attn", "layer.2.attn", "layer.2.mlp", "layer.10.attn", "layer.10.mlp",
                                 "other"]
    assert unit_order(["layer.11", "layer.3", "layer.0"]) == ["layer.0", "layer.3", "layer.11"]


def test_round_summary_counts_best_and_projector_loss(tmp_path) -> None:
    exp = _experiment(tmp_path, [(0, 0, _result(0.6, 0.5, 0.5)), (0, 1, None), (0, 2, _result(0.8, 0.7, 0.3)),
                                 (1, 0, _result(0.7, 0.4, 0.6, projector_version=1))])
    s = round_summary(load_trials(exp.root), exp.root).set_index("round")
    assert s.loc[0, ["trials", "completed", "errored"]].tolist() == [3, 2, 1]
    assert s.loc[0, "best_objective"] == pytest.approx(0.7) and s.loc[0, "kept_fraction"] == pytest.approx(0.7)
    assert s.loc[1, "projector_version"] == 1 and s.loc[1, "projector_loss_after"] == pytest.approx(1.5)
    assert pd.isna(s.loc[0, "projector_loss_before"])  # version 0 = the checkpoint's projector, never trained


def test_write_report_writes_pngs_referenced_by_html(tmp_path) -> None:
    exp = _experiment(tmp_path, [(0, 0, _result(0.6, 0.5, 0.5)), (0, 1, None), (1, 0, _result(0.7, 0.4, 0.6))])
    heldout = {"best": {"accuracy": 0.66, "kept_fraction": 0.4}, "uniform": {"accuracy": 0.5, "kept_fraction": 0.4}}
    path = write_report(exp.root, heldout=heldout)
    assert path == exp.root / "report" / "report.html"
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    assert pngs == ["objective.png", "pareto.png", "sparsity.png"]
    assert all((path.parent / p).read_bytes().startswith(b"\x89PNG") for p in pngs)
    page = path.read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs
    assert "Held-out comparison" in page and "uniform" in page and "<script" not in page
    assert "http" not in page  # self-contained: nothing fetched from the network


def test_write_report_single_trial_and_zero_completed(tmp_path) -> None:
    one = _experiment(tmp_path / "one", [(0, 0, _result(0.6, 0.5, 0.5))], projector=False)
    assert len(list((write_report(one.root)).parent.glob("*.png"))) == 3

    none = _experiment(tmp_path / "none", [(0, 0, None), (0, 1, None)])
    page = write_report(none.root).read_text()
    assert "No completed trials yet" in page and "<img" not in page
    assert not list((none.root / "report").glob("*.png"))

    empty = _experiment(tmp_path / "empty", [])
    assert "No completed trials yet" in write_report(empty.root).read_text()


def test_write_report_rejects_malformed_heldout(tmp_path) -> None:
    exp = _experiment(tmp_path, [(0, 0, _result(0.6, 0.5, 0.5))])
    with pytest.raises(ConfigError, match="heldout"):
        write_report(exp.root, heldout={"best": 0.6})
