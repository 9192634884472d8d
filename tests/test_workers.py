"""Workers that live across rounds, on the real pruning problem: a 3-round tiny search loads the model once
per worker, every worker takes trials, the projector reaches the workers through Ray, and one variant bank
serves the whole search (projector.rebuild_bank: false, the default) from the node's cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import yaml

from efficientllava.config import load_config
from efficientllava.models.tiny import home_dir
from efficientllava.search.runner import run_search
from efficientllava.search.workers import NAMESPACE
from efficientllava.trials import load_trials

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ROUNDS, TRIALS = 3, 4


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE)
    yield
    ray.shutdown()


def test_three_round_tiny_search_loads_the_model_once_per_worker(tmp_path):
    cfg = yaml.safe_load((REPO / "experiments" / "tiny.yaml").read_text())
    cfg["space"] = str(REPO / "search_spaces" / "tiny.yaml")
    cfg["search"].update(rounds=ROUNDS, trials_per_round=TRIALS, max_concurrent=2)
    cfg["projector"]["steps"] = 2
    cfg["storage"] = str(tmp_path / "runs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    root = run_search(load_config(tmp_path / "tiny.yaml"), heldout=True)

    df = load_trials(root)
    assert df.groupby("round").size().to_dict() == {r: TRIALS for r in range(ROUNDS)}
    assert (df["status"] == "COMPLETE").all()
    for r in range(ROUNDS):
        (infos,) = [json.loads(p.read_text()) for p in (root / "rounds" / f"round-{r}").glob("workers-*.json")]
        assert sorted(i["worker"] for i in infos) == ["w0", "w1"]
        assert [i["problem"]["model_loads"] for i in infos] == [1, 1], f"round {r}: {infos}"
    assert set(df["worker"]) == {"w0", "w1"}, "every worker takes trials"
    # Round r ran with projector v r, shipped to the workers (they never read projector/ themselves).
    assert df.groupby("round")["projector_version"].unique().map(list).to_dict() == {r: [r] for r in range(ROUNDS)}
    assert sorted(p.name for p in (root / "projector").glob("*.safetensors")) == [
        f"projector-{v}.safetensors" for v in range(1, ROUNDS)]
    # One bank for the whole search, in the node's cache, none in the experiment directory.
    (bank,) = set(df["bank"])
    assert (Path(home_dir()) / "banks" / bank / "manifest.json").is_file()
    assert not (root / "banks").exists()
    # The held-out check ran on a worker that already held the model (still one load per worker).
    heldout = json.loads((root / "heldout.json").read_text())
    assert set(heldout) == {"dense", "uniform", "best"} and heldout["best"]["round"] in range(ROUNDS)
    (run,) = [json.loads(p.read_text()) for p in (root / "rounds").glob("run-*.json")]
    assert [i["problem"]["model_loads"] for i in run["workers"]] == [1, 1]
