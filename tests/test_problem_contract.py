"""Both problems pass the SearchProblem contract (efficientllava.testing.contract), without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from efficientllava.config import config_from_dict
from efficientllava.testing.contract import SearchProblemContract

REPO = Path(__file__).resolve().parents[1]


class TestQuadraticProblem(SearchProblemContract):
    @pytest.fixture
    def config(self, tmp_path):
        space = {"params": {"x_0": [0, 9], "x_1": [2, 5]}, "weights": {"x_0": 3}, "budget": {"target": 4},
                 "seeds": {"centre": {"x_0": 4, "x_1": 4}}}
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
        return config_from_dict({"name": "toy", "problem": "efficientllava.testing.toy:QuadraticProblem",
                                 "space": "space.yaml"}, tmp_path / "exp.yaml")


@pytest.mark.slow
class TestPruningProblem(SearchProblemContract):
    """The tiny model (cached), a magnitude space with 3 levels, 16 shots, 2 projector steps."""

    @pytest.fixture
    def config(self, tmp_path):
        space = {"granularity": "sublayer", "levels": [0.5, 0.7, 0.9], "budget": {"target": 0.7},
                 "method": "magnitude"}
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
        return config_from_dict({
            "name": "prune", "space": "space.yaml", "data": {"n_shots": 16, "heldout_size": 16},
            "projector": {"steps": 2, "top_k": 2, "batch_size": 8}, "eval": {"batch_size": 16},
        }, tmp_path / "exp.yaml")


def test_seed_points_keep_their_order_on_disk(tmp_path):
    """Round 0 keeps its first trials_per_round // 2 seeds, so the file must keep uniform and error DP first."""
    import json

    from efficientllava.problem.pruning import _read_seeds, _write_seeds

    names = ["uniform", "error-dp", "owl", "slope+0.060", "round-0-top10", "round-0-top2"]
    points = {n: {"layer.0": i, "layer.1": 2 * i} for i, n in enumerate(names)}
    _write_seeds(tmp_path / "seeds.json", points)
    assert list(_read_seeds(tmp_path / "seeds.json").items()) == list(points.items())
    (tmp_path / "old.json").write_text(json.dumps({"owl": {"layer.0": 1}, "uniform": {"layer.0": 0}}))
    assert _read_seeds(tmp_path / "old.json") == {"owl": {"layer.0": 1}, "uniform": {"layer.0": 0}}


@pytest.mark.slow
@pytest.mark.parametrize("error_dp", [True, False])
def test_round_0_starts_with_uniform_then_error_dp_from_round_0s_own_bank(tmp_path, monkeypatch, error_dp):
    import pickle

    from efficientllava.experiment import create_experiment
    from efficientllava.search.api import LocalContext, build_problem

    monkeypatch.setenv("EFFICIENTLLAVA_HOME", str(tmp_path / "home"))
    space = {"granularity": "sublayer", "levels": [0.5, 0.6, 0.7, 0.8, 0.9], "budget": {"target": 0.7},
             "method": "wanda"}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    cfg = config_from_dict({"name": "prune", "space": "space.yaml", "data": {"n_shots": 16, "heldout_size": 16},
                            "search": {"trials_per_round": 4, "error_dp": error_dp}}, tmp_path / "exp.yaml")
    exp = create_experiment(cfg, tmp_path / "experiment")
    driver, worker = build_problem(cfg), build_problem(cfg)
    ctx = LocalContext(exp.root, worker)
    state = driver.initial_state(ctx)
    assert list(driver.seed_points(state, ctx)) == (["uniform", "error-dp"] if error_dp else ["uniform", "owl"])
    worker.enter_round(state, pickle.loads(pickle.dumps(driver.round_inputs(state, ctx))))
    # error DP built round 0's bank, and round 0 opened that same bank instead of building another
    assert len([p for p in (tmp_path / "home" / "banks").iterdir() if p.is_dir()]) == 1
    # The error table error DP read reaches the driver's space (the guided sampler's damage curves).
    params = driver.space(state, ctx).params
    if error_dp:
        assert all(p.errors is not None and len(p.errors) == p.high + 1 and p.errors[-1] > 0 for p in params)
        assert state.payload["errors"] == "errors/round-0.json"
    else:
        assert all(p.errors is None for p in params) and "errors" not in state.payload
    # The default sampler reads attributions, so a trial reports each unit's share of its KL.
    result = worker.evaluate(driver.seed_points(state, ctx)["uniform"], state)
    shares = {k: v for k, v in result.items() if k.startswith("attribution/")}
    assert set(shares) == {f"attribution/{p.name}" for p in params} and sum(shares.values()) > 0
