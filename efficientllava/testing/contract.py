"""The contract every SearchProblem passes (like Optuna's BasicSamplerTestCase), run without Ray.

Use it from a test module:

    class TestMyProblem(SearchProblemContract):
        @pytest.fixture
        def config(self, tmp_path):
            return config_from_dict({...}, tmp_path / "exp.yaml")

The suite plays the engine in one process: a driver-side instance with a `LocalContext` whose
`call` runs on a separate worker-side instance, the round inputs pickled as Ray would ship them,
and the experiment directory hidden while the worker works (workers must never read it).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from efficientllava.experiment import create_experiment
from efficientllava.search.api import METRIC, LocalContext, RoundState, Space, build_problem
from efficientllava.trials import records_to_frame, trial_record


@contextmanager
def hidden(root: Path) -> Iterator[None]:
    """The experiment directory moved away for the duration (a worker on another node cannot see it)."""
    away = root.with_name(root.name + ".hidden")
    shutil.move(str(root), str(away))
    try:
        yield
    finally:
        shutil.move(str(away), str(root))


def corner(space: Space, high: bool = True) -> dict[str, int]:
    """Every parameter at its highest (or lowest) value."""
    return {p.name: p.high if high else p.low for p in space.params}


def _relative_paths_only(payload: Any, where: str = "payload") -> None:
    """No absolute path anywhere in a payload (a moved experiment directory must still resume)."""
    if isinstance(payload, dict):
        for k, v in payload.items():
            _relative_paths_only(v, f"{where}.{k}")
    elif isinstance(payload, list):
        for i, v in enumerate(payload):
            _relative_paths_only(v, f"{where}[{i}]")
    elif isinstance(payload, str):
        assert not Path(payload).is_absolute(), f"{where} = {payload!r} is an absolute path"


class SearchProblemContract:
    """Tests every SearchProblem passes; subclass and provide the `config` fixture."""

    @pytest.fixture
    def config(self, tmp_path: Path) -> Any:
        """The experiment config of the problem under test."""
        raise NotImplementedError

    @pytest.fixture
    def setup(self, config: Any, tmp_path: Path) -> tuple[Any, LocalContext, RoundState]:
        """(driver-side problem, a context whose calls run on a worker-side instance, round 0's state)."""
        exp = create_experiment(config, tmp_path / "experiment")
        driver, worker = build_problem(config), build_problem(config)
        ctx = LocalContext(exp.root, worker)
        return driver, ctx, driver.initial_state(ctx)

    def _enter(self, driver: Any, ctx: LocalContext, state: RoundState) -> Any:
        """Ship the round's inputs as Ray would and enter the worker into the round, the directory hidden."""
        inputs = pickle.loads(pickle.dumps(driver.round_inputs(state, ctx)))
        with hidden(ctx.root):
            ctx.worker.enter_round(state, inputs)
        return inputs

    def _evaluate(self, ctx: LocalContext, state: RoundState, params: dict[str, int]) -> dict[str, Any]:
        with hidden(ctx.root):
            return dict(ctx.worker.evaluate(params, state))

    def test_objectives_start_with_the_metric(self, setup: Any) -> None:
        driver, _, _ = setup
        assert driver.objectives[0].name == METRIC and driver.objectives[0].mode == "max"
        assert len({o.name for o in driver.objectives}) == len(driver.objectives)

    def test_initial_state_is_round_0_with_a_relative_json_payload(self, setup: Any) -> None:
        _, ctx, state = setup
        assert state.round == 0
        assert RoundState.from_json(json.loads(json.dumps(state.to_json()))) == state
        _relative_paths_only(dict(state.payload))

    def test_space_is_data_and_seed_points_are_in_it(self, setup: Any) -> None:
        driver, ctx, state = setup
        space = driver.space(state, ctx)
        assert isinstance(space, Space) and space.params
        assert all(p.low <= p.high and p.weight > 0 for p in space.params)
        if space.budget is not None:  # the budget is reachable: every parameter at its top meets it
            assert space.budget.within(space.weighted_mean(corner(space)))
        for name, point in driver.seed_points(state, ctx).items():
            assert space.contains(dict(point)), name

    def test_workers_evaluate_from_shipped_inputs_only(self, setup: Any) -> None:
        driver, ctx, state = setup
        space = driver.space(state, ctx)
        self._enter(driver, ctx, state)
        points = [corner(space), corner(space, high=False), *map(dict, driver.seed_points(state, ctx).values())]
        for point in points:
            result = self._evaluate(ctx, state, point)
            for o in driver.objectives:
                value = result[o.name]
                assert isinstance(value, (int, float)) and math.isfinite(value), (o.name, value)
        json.dumps({k: v for k, v in result.items()}, default=str)

    def test_after_round_gives_the_next_round(self, setup: Any) -> None:
        driver, ctx, state = setup
        space = driver.space(state, ctx)
        self._enter(driver, ctx, state)
        points = [corner(space), corner(space, high=False)]
        records = []
        for n, point in enumerate(points):
            result = self._evaluate(ctx, state, point)
            records.append(trial_record(state=state, number=n, trial_id=str(n), params=point, result=result,
                                        error=None, started=0.0, finished=1.0, eval_s=1.0, retry_of=None))
        nxt = driver.after_round(state, records_to_frame(records), ctx)
        assert nxt.round == 1
        _relative_paths_only(dict(nxt.payload))
        space1 = driver.space(nxt, ctx)
        self._enter(driver, ctx, nxt)
        result = self._evaluate(ctx, nxt, corner(space1))
        assert math.isfinite(result[METRIC])
