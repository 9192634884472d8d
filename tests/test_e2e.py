"""End to end on the built-in tiny model: `efficientllava search` (3 rounds x 6 trials), then trials, export, resume.

It also shows the workers living across rounds on the real problem: each loads the model once per search
(counted), every worker takes trials, the projector reaches them through Ray, one bank serves the search.

Every step runs the installed `efficientllava` command in a subprocess, as a user would; Ray runs in
each subprocess's own private temp dir, and every process of it is killed at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from rayprocs import kill_ray

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ROUNDS, TRIALS, STEPS = 3, 6, 5
LAYERS = 6  # decoder layers of the built-in tiny model
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Generous: on a fresh machine the first search also trains the tiny model (~3 min); cached, it takes ~1.5 min.
SEARCH_TIMEOUT_S = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(args: list[str], ray_tmp: str, log: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run `efficientllava ARGS` in its own session, with Ray's temp dir at `ray_tmp`; output also in `log`."""
    exe = shutil.which("efficientllava")
    assert exe, "the `efficientllava` command is not on PATH; install the package (pip install -e .)"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp,
           # Ray otherwise advertises the machine's first non-loopback address; keep it on 127.0.0.1.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own, never one the caller may point at
    with log.open("w") as out:
        proc = subprocess.Popen([exe, *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=log.parent)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"efficientllava {args[0]} ran past {timeout}s:\n{log.read_text()[-4000:]}")
    return subprocess.CompletedProcess(args, rc, log.read_text(), "")


def ok(result: subprocess.CompletedProcess) -> str:
    """The output of a run that must have exited 0."""
    assert result.returncode == 0, f"efficientllava {' '.join(result.args)} exited {result.returncode}:\n" \
                                   f"{result.stdout[-5000:]}"
    return result.stdout


def write_config(tmp_path: Path) -> Path:
    """experiments/tiny.yaml, reduced: 3 rounds x 6 trials, 5 projector steps, 128 held-out samples, storage in tmp_path."""
    cfg = yaml.safe_load((REPO / "experiments" / "tiny.yaml").read_text())
    cfg["space"] = str(REPO / "search_spaces" / "tiny.yaml")
    cfg["search"].update(rounds=ROUNDS, trials_per_round=TRIALS, max_concurrent=2)
    cfg["projector"]["steps"] = STEPS
    cfg["data"]["heldout_size"] = 128  # the held-out check runs twice (search, resume): keep it short
    cfg["storage"] = str(tmp_path / "runs")
    path = tmp_path / "tiny-e2e.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def unit_of(layer: int, linear: str, granularity: str) -> str:
    """The prunable unit that owns decoder layer `layer`'s `linear` ("layer.3" or "layer.3.attn"/"layer.3.mlp")."""
    if granularity == "layer":
        return f"layer.{layer}"
    return f"layer.{layer}.{'attn' if linear in ATTN else 'mlp'}"


def study_trials(root: Path) -> dict[int, list]:
    """Each round's Optuna trials, read from the experiment's journal."""
    import optuna

    from efficientllava.experiment import open_experiment

    storage = open_experiment(root).storage()
    return {r: optuna.load_study(study_name=f"round-{r}", storage=storage).get_trials(deepcopy=False)
            for r in range(ROUNDS)}


def test_search_trials_export_resume_on_tiny(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from efficientllava import load_trials
    from efficientllava.space import load_space

    config = write_config(tmp_path)
    root = tmp_path / "exp"
    markers = [tempfile.mkdtemp(prefix="ele", dir="/tmp") for _ in range(2)]  # short: Ray's socket paths
    try:
        t0 = time.time()
        ok(cli(["search", str(config), "--dir", str(root)], markers[0], tmp_path / "search.log", SEARCH_TIMEOUT_S))
        search_s = time.time() - t0
        assert not kill_ray(markers[0]), "Ray processes outlived `efficientllava search`"

        # 1. The experiment directory holds everything the search promises.
        for name in ("config.yaml", "study.journal", "state.json", "trials.parquet", "best_policy.json",
                     "heldout.json", "spaces/round-0.yaml", "spaces/round-1.yaml",
                     "projector/projector-1.safetensors", "projector/projector-1.json", "report/report.html"):
            assert (root / name).is_file() and (root / name).stat().st_size > 0, name
        state = json.loads((root / "state.json").read_text())
        assert state["status"] == "done" and state["round"] == ROUNDS - 1 and len(state["history"]) == ROUNDS
        trial_files = sorted(p.name for p in (root / "trials").glob("*.json"))
        assert trial_files == sorted(f"{r}-{n}.json" for r in range(ROUNDS) for n in range(TRIALS))
        # Round 0 starts from the known allocations, uniform and error DP (from round 0's own bank) first.
        seeded = {json.loads((root / "trials" / f"0-{n}.json").read_text()).get("seed") for n in range(TRIALS)}
        assert {"uniform", "error-dp"} <= seeded, seeded
        studies = study_trials(root)
        assert all(len(ts) == TRIALS and all(t.state.name == "COMPLETE" for t in ts) for ts in studies.values())
        # The default (guided) sampler got every trial's per-unit KL shares, through Tune, on the study.
        assert all(len(t.user_attrs["attribution"]) == len(t.params) for ts in studies.values() for t in ts)
        assert (root / "errors" / "round-0.json").is_file()

        space0 = load_space(root / "spaces" / "round-0.yaml")
        units = space0.unit_names(LAYERS)
        assert {unit_of(i, lin, space0.granularity) for i in range(LAYERS) for lin in ATTN + MLP} == set(units)
        projector = json.loads((root / "projector" / "projector-1.json").read_text())
        assert projector["round"] == 0 and projector["version"] == 1 and projector["steps"] == STEPS
        assert math.isfinite(projector["loss_before"]) and math.isfinite(projector["loss_after"])
        # One variant bank for the whole search (projector.rebuild_bank: false), in the node's bank cache:
        # the experiment directory holds no bank.
        assert not (root / "banks").exists()
        banks = set(load_trials(root)["bank"])
        assert len(banks) == 1, "one variant bank per search"
        home = Path(os.environ.get("EFFICIENTLLAVA_HOME", Path.home() / ".cache" / "efficientllava"))
        assert all((home / "banks" / b / "manifest.json").is_file() for b in banks)
        # What a person sees: no traceback, our own lines (no Tune tables), one progress line per update.
        log = (tmp_path / "search.log").read_text()
        assert "Traceback" not in log and "Exception ignored" not in log and "== Status ==" not in log, log[-3000:]
        ours = [line for line in log.splitlines() if line.startswith("[efficientllava]")]
        assert sum("round 0: 6 trials" in line for line in ours) == 1 and any("report:" in line for line in ours)
        # Only our lines and the directory the CLI prints last: no Ray warnings (token auth), no
        # `(EvalWorker pid=...)` copies of worker output, no ANSI colour codes. The workers' own records
        # (the variant bank line) still come through, relayed by the driver as plain lines.
        others = [line for line in log.splitlines() if line and not line.startswith("[efficientllava]")]
        assert others == [str(root)], others
        assert "\x1b[" not in log and "pid=" not in log
        assert any("variant bank" in line and "ready" in line for line in ours), log[-3000:]
        print(f"search output: {len(log.splitlines())} lines, {len(ours)} of them [efficientllava] lines")
        # Workers live across rounds: each loaded the model once for the whole search (the held-out check
        # included: run-*.json is written after it), and every worker took trials.
        for r in range(ROUNDS):
            (infos,) = [json.loads(p.read_text()) for p in (root / "rounds" / f"round-{r}").glob("workers-*.json")]
            assert sorted(i["worker"] for i in infos) == ["w0", "w1"]
            assert [i["problem"]["model_loads"] for i in infos] == [1, 1], f"round {r}: {infos}"
        (run,) = [json.loads(p.read_text()) for p in (root / "rounds").glob("run-*.json")]
        assert [i["problem"]["model_loads"] for i in run["workers"]] == [1, 1]
        assert set(load_trials(root)["worker"]) == {"w0", "w1"}, "every worker takes trials"
        assert sorted(p.name for p in (root / "projector").glob("*.safetensors")) == [
            f"projector-{v}.safetensors" for v in range(1, ROUNDS)]

        # 2. The trial table: 18 typed rows over 3 rounds; round r ran with projector v r, shipped to the workers.
        df = load_trials(root)
        assert len(df) == ROUNDS * TRIALS and (df["status"] == "COMPLETE").all()
        assert df["round"].dtype == "int64" and df["number"].dtype == "int64"
        assert isinstance(df["status"].dtype, pd.CategoricalDtype)
        assert str(df["projector_version"].dtype) == "Int64" and str(df["retry_of"].dtype) == "Int64"
        assert df["retry_of"].isna().all()
        for col in ("objective", "accuracy", "gap", "mean_sparsity", "kept_fraction", "flops_speedup",
                    "eval_s", "wall_s", *(f"policy/{u}" for u in units)):
            assert df[col].dtype == "float64", col
            assert df[col].notna().all(), col
        assert df.groupby("round").size().to_dict() == {r: TRIALS for r in range(ROUNDS)}
        assert df.groupby("round")["projector_version"].unique().map(list).to_dict() == {r: [r] for r in range(ROUNDS)}
        parquet = pd.read_parquet(root / "trials.parquet")
        assert list(parquet.columns) == list(df.columns) and len(parquet) == len(df)
        assert parquet["objective"].tolist() == df["objective"].tolist()

        # 3. The best policy: the best row, one level of the space per layer, on budget.
        best = json.loads((root / "best_policy.json").read_text())
        assert set(best["policy"]) == set(units)  # every linear of layers 0-5 is covered (checked above)
        assert best["objective"] == df["objective"].max()
        row = df[(df["round"] == best["round"]) & (df["number"] == best["number"])].iloc[0]
        assert row["objective"] == best["objective"]
        space_b = load_space(root / best["state"]["space"])
        for unit, ratio in best["policy"].items():
            assert row[f"policy/{unit}"] == ratio
            assert any(abs(ratio - lv) < 1e-9 for lv in space_b.levels_for(unit)), (unit, ratio)
            assert any(abs(ratio - lv) < 1e-9 for lv in space0.levels_for(unit)), (unit, ratio)
        assert space0.budget.in_band(best["mean_sparsity"])  # at the budget, within its tolerance (issue 8)
        assert best["projector_version"] == best["round"]  # one projector version per finished round

        # 4. Held-out comparison and report.
        heldout = json.loads((root / "heldout.json").read_text())
        assert set(heldout) == {"dense", "uniform", "best"}
        assert heldout["dense"]["mean_sparsity"] == 0.0
        for name in ("uniform", "best"):
            assert space0.budget.in_band(heldout[name]["mean_sparsity"]), name
        for entry in heldout.values():
            assert 0.0 <= entry["accuracy"] <= 1.0 and entry["n"] > 0
        assert heldout["best"]["round"] == best["round"]
        html = (root / "report" / "report.html").read_text()
        assert "Held-out comparison" in html and "Best policy" in html
        pngs = sorted((root / "report").glob("*.png"))
        assert {p.name for p in pngs} >= {"objective.png", "sparsity.png"}
        for png in pngs:
            assert png.read_bytes().startswith(PNG_MAGIC) and png.name in html, png.name

        # 5. The trial table from the command line.
        top = ok(cli(["trials", str(root), "--top", "3"], markers[1], tmp_path / "top.log", 120))
        lines = top.strip().splitlines()
        assert len(lines) == 4 and lines[0].split()[:4] == ["round", "number", "status", "objective"], top
        want = df.sort_values("objective", ascending=False).head(3)
        assert [tuple(int(x) for x in line.split()[:2]) for line in lines[1:]] == \
            list(zip(want["round"], want["number"], strict=True))
        out_csv = tmp_path / "out.csv"
        assert f"wrote {ROUNDS * TRIALS} trials" in ok(cli(["trials", str(root), "--csv", str(out_csv)], markers[1],
                                           tmp_path / "csv.log", 120))
        csv = pd.read_csv(out_csv)
        assert list(csv.columns) == list(df.columns) and len(csv) == len(df)
        assert csv["objective"].tolist() == pytest.approx(df["objective"].tolist())

        # 6. Export: a plain transformers checkpoint whose LM linears carry the best policy.
        out = tmp_path / "pruned"
        ok(cli(["export", str(root), "--out", str(out)], markers[1], tmp_path / "export.log", 300))
        model = LlavaForConditionalGeneration.from_pretrained(out)
        layers = model.model.language_model.layers
        assert len(layers) == LAYERS
        weighted = total = 0
        for i, layer in enumerate(layers):
            for name in ATTN + MLP:
                ratio = best["policy"][unit_of(i, name, space0.granularity)]
                w = layer.get_submodule(name).weight.detach()
                frac = float((w == 0).sum()) / w.numel()
                assert abs(frac - ratio) <= 1 / w.shape[1], (i, name, frac, ratio)
                weighted, total = weighted + frac * w.numel(), total + w.numel()
        assert weighted / total >= space0.budget.floor - 1e-3
        assert json.loads((out / "policy.json").read_text())["ratios"] == best["policy"]
        if best["state"].get("projector"):  # the exported model carries the projector the best trial ran with
            from safetensors.torch import load_file

            trained = load_file(root / best["state"]["projector"])
            exported = model.model.multi_modal_projector.state_dict()
            for key, value in trained.items():
                torch.testing.assert_close(exported[key], value.to(exported[key].dtype), msg=key)

        # 7. Resuming a finished search changes no trial and adds none.
        before = {p.name: p.read_bytes() for p in (root / "trials").glob("*.json")}
        ok(cli(["resume", str(root)], markers[1], tmp_path / "resume.log", SEARCH_TIMEOUT_S))
        assert not kill_ray(markers[1]), "Ray processes outlived `efficientllava resume`"
        assert {p.name: p.read_bytes() for p in (root / "trials").glob("*.json")} == before
        assert {r: len(ts) for r, ts in study_trials(root).items()} == {r: TRIALS for r in range(ROUNDS)}
        assert json.loads((root / "state.json").read_text())["status"] == "done"
        assert len(load_trials(root)) == ROUNDS * TRIALS
        print(f"search {search_s:.0f}s, whole test {time.time() - t0:.0f}s")
    finally:
        for marker in markers:
            kill_ray(marker)  # after a failure too: never leave a Ray cluster behind
            shutil.rmtree(marker, ignore_errors=True)
