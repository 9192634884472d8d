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
