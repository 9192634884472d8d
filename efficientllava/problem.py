"""The LLaVA pruning problem the search solves: policies over a space, scored by accuracy - SRM gap.

Heavy work (loading the model, building a variant bank, optimising the projector) runs where
trials run: in the reused trial actors, and in one Ray task with the trials' resources between
rounds, so a GPU cluster's head node needs no GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray

from efficientllava.allocations import seed_points
from efficientllava.config import ExperimentConfig
from efficientllava.errors import PolicyError
from efficientllava.evolution import describe_evolution, evolve_space
from efficientllava.experiment import ExperimentDir
from efficientllava.models.loading import resolve_spec
from efficientllava.pipeline import Pipeline, open_pipeline
from efficientllava.policy import PruningPolicy
from efficientllava.projector import load_projector, optimize_projector, save_projector
from efficientllava.pruning.bank import VariantBank, bank_bytes
from efficientllava.scoring.objective import PolicyScorer
from efficientllava.scoring.srm import SRMConfig
from efficientllava.search.problem import RoundState
from efficientllava.search.samplers.evolution import LevelBudget, LevelParam, LevelSpace
from efficientllava.search.study import STATUS_OK, open_study
from efficientllava.space import SearchSpace, dump_space, fit_to_budget, load_space, policy_indices

MODEL_FILE = "model.json"  # facts about the model the driver needs without loading it (unit parameter counts)
SEEDS_FROM_PREVIOUS_ROUND = 3  # a round > 0 starts from this many of the previous round's best policies


def srm_config(cfg: ExperimentConfig) -> SRMConfig:
    """The SRM constants of an experiment."""
    o = cfg.objective
    return SRMConfig(lam=o.lam, delta=o.delta, scale=o.scale, aggregate=o.aggregate)


def num_layers_of(spec: str) -> int:
    """Decoder layers of a checkpoint, read from its config only (no weights loaded)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve_spec(spec)).text_config.num_hidden_layers)


def resolved_space(space: SearchSpace, num_layers: int) -> SearchSpace:
    """`space` with every unit's levels written out (so each round's space file is self-contained)."""
    return space.with_unit_levels({u: space.levels_for(u) for u in space.unit_names(num_layers)})


def params_to_policy(params: dict[str, Any], space: SearchSpace, units: list[str]) -> PruningPolicy:
    """Sampled level indices -> the policy they name (before budget repair)."""
    return PruningPolicy(tuple((u, space.levels_for(u)[int(params[u])]) for u in units))


def open_round(cfg: ExperimentConfig, root: str | Path, projector_path: str | None, projector_version: int,
               space_path: str) -> tuple[Pipeline, SearchSpace, VariantBank]:
    """The model with a round's projector, the round's space, and its variant bank (built once).

    With `projector.rebuild_bank` (default) the bank is calibrated with the round's projector, whose
    outputs are the LLM's inputs on image tokens; otherwise with the checkpoint's own projector,
    so the pruned weights stay those of round 0 and only the projector changes.
    """
    pipeline = open_pipeline(cfg.model, cfg.data, cfg.eval.batch_size)
    space = load_space(space_path)
    banks = Path(root) / "banks"
    bank = None if cfg.projector.rebuild_bank else pipeline.bank(space, banks, 0)
    if projector_path:
        load_projector(pipeline.model, projector_path)
    if bank is None:
        bank = pipeline.bank(space, banks, projector_version)
    return pipeline, space, bank


class RoundSession:
    """Everything one round's trials share inside an actor: pipeline, space, bank, scorer."""

    def __init__(self, cfg: ExperimentConfig, root: Path, state: RoundState):
        self.pipeline, self.space, self.bank = open_round(cfg, root, state.projector_path, state.projector_version,
                                                          state.space_path)
        self.units = self.space.unit_names(self.pipeline.num_layers)
        self.bank.preload(self.pipeline.loaded.device)  # when it fits: trials then copy device-to-device
        self.scorer: PolicyScorer = self.pipeline.scorer(self.space, self.bank, srm_config(cfg), cfg.objective.fidelity)

    def policy(self, params: dict[str, Any]) -> tuple[PruningPolicy, PruningPolicy]:
        """(sampled policy, the policy actually scored): projected or repaired onto the budget as configured."""
        raw = params_to_policy(params, self.space, self.units)
        return raw, fit_to_budget(raw, self.space, self.scorer.weights)


def run_heavy(cfg: ExperimentConfig, fn: Any, *args: Any) -> Any:
    """Run `fn(*args)` in a Ray task with the trials' resources (inline when Ray is not running)."""
    if not ray.is_initialized():
        return fn(*args)
    task = ray.remote(fn).options(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu, max_retries=1)
    return ray.get(task.remote(*args))


def prepare_round(cfg: ExperimentConfig, root: str, state: RoundState) -> dict[str, Any]:
    """Build (or find) the variant bank of a round so that trials only open it; round 0 also gets its seed points."""
    start = time.perf_counter()
    pipeline, space, bank = open_round(cfg, root, state.projector_path, state.projector_version, state.space_path)
    info: dict[str, Any] = {"bank": str(bank.root), "bank_bytes": bank_bytes(bank.root),
                            "seconds": time.perf_counter() - start}
    if state.round == 0:
        weights = pipeline.cost_model(space.granularity).unit_param_counts()
        info["unit_params"] = weights
        info["seeds"] = seed_points(pipeline.model, pipeline.fewshot_batches, space, weights)
    return info


def advance_round(cfg: ExperimentConfig, root: str, state: RoundState, top: list[dict[str, float]]) -> RoundState:
    """Between rounds: optimise the projector under the top policies, evolve the space, build the next bank."""
    root_path = Path(root)
    session = RoundSession(cfg, root_path, state)
    policies = [PruningPolicy.from_mapping(p) for p in top]
    nxt = state.round + 1
    version, proj_path = state.projector_version, state.projector_path
    if cfg.projector.enabled and policies and cfg.projector.steps > 0:
        # The scorer's materializer already holds the dense copy; a second one would double it (13 GB on 7B).
        result = optimize_projector(session.pipeline.model, session.pipeline.fewshot_batches,
                                    session.scorer.materializer,
                                    policies[: cfg.projector.top_k], steps=cfg.projector.steps, lr=cfg.projector.lr,
                                    weight_decay=cfg.projector.weight_decay)
        version += 1
        proj_path = str(root_path / "projector" / f"projector-{version}.safetensors")
        save_projector(session.pipeline.model, proj_path)
        (root_path / "projector" / f"projector-{version}.json").write_text(json.dumps({
            "round": state.round, "version": version, "loss_before": result.loss_before,
            "loss_after": result.loss_after, "steps": result.steps, "seconds": result.seconds,
            "policies": [p.as_dict() for p in policies[: cfg.projector.top_k]]}, indent=1))
        print(f"[round {state.round}] projector v{version}: few-shot loss {result.loss_before:.4f} -> "
              f"{result.loss_after:.4f} under top-{len(policies[: cfg.projector.top_k])} policies", flush=True)
    space = session.space
    if cfg.evolution.enabled and policies:
        evolved = evolve_space(space, policies[: cfg.evolution.top_k], cfg.evolution.margin, session.scorer.weights)
        print(f"[round {state.round}] space evolved:\n{describe_evolution(space, evolved)}", flush=True)
        space = evolved
    space_path = dump_space(space, root_path / "spaces" / f"round-{nxt}.yaml")
    next_state = RoundState(nxt, version, proj_path, str(space_path))
    del session
    prepare_round(cfg, root, next_state)
    return next_state


class PruningProblem:
    """SearchProblem for LLaVA pruning policies (see efficientllava.search.problem.SearchProblem)."""

    def __init__(self, config: ExperimentConfig, experiment_dir: str | Path):
        self.config = config
        self.root = Path(experiment_dir)
        self._session: tuple[RoundState, RoundSession] | None = None
        self._spaces: dict[str, SearchSpace] = {}

    def _space(self, path: str) -> SearchSpace:
        if path not in self._spaces:
            self._spaces[path] = load_space(path)
        return self._spaces[path]

    def define_space(self, trial: optuna.Trial, state: RoundState) -> None:
        """One ordinal parameter per unit: the index of its level in this round's space."""
        space = self._space(state.space_path)
        for unit, levels in space.unit_levels:
            trial.suggest_int(unit, 0, len(levels) - 1)

    def session(self, state: RoundState) -> RoundSession:
        """The actor's cached heavy state for `state` (rebuilt when the round changes)."""
        if self._session is None or self._session[0] != state:
            self._session = None  # free the previous round's model first
            self._session = (state, RoundSession(self.config, self.root, state))
        return self._session[1]

    def evaluate(self, params: dict[str, Any], state: RoundState) -> dict[str, Any]:
        """Score the policy that `params` name: every term, the policy, and provenance."""
        session = self.session(state)
        raw, policy = session.policy(params)
        score = session.scorer.score(policy)
        return {
            **score.as_dict(),
            **{f"policy/{u}": r for u, r in policy.ratios},
            "policy_key": policy.key,
            "repaired": policy != raw,
            "bank": session.bank.fingerprint,
            "fewshot": session.pipeline.task.fingerprint,
        }

    def initial_state(self) -> RoundState:
        """Round 0: the configured space with every unit's levels written out, the checkpoint's projector."""
        space = resolved_space(load_space(self.config.space), num_layers_of(self.config.model.spec))
        path = dump_space(space, self.root / "spaces" / "round-0.yaml")
        state = RoundState(0, 0, None, str(path))
        info = run_heavy(self.config, prepare_round, self.config, str(self.root), state)
        (self.root / MODEL_FILE).write_text(json.dumps({"unit_params": info["unit_params"]}))
        if self.config.search.uniform_first:
            # The baseline, then the known allocations (allocations.seed_policies), are the first trials: they
            # sit in the trial table, and the sampler starts from them.
            study = open_study(ExperimentDir(self.root), 0)
            if not study.trials:  # a start killed before state.json was written must not enqueue them twice
                # At most half the round, so the sampler has trials of its own.
                for name, point in list(info["seeds"].items())[: max(1, self.config.search.trials_per_round // 2)]:
                    study.enqueue_trial(point, user_attrs={"baseline": name})
        print(f"[round 0] variant bank ready: {info['bank']} ({info['bank_bytes'] / 2**20:.1f} MiB, "
              f"{info['seconds']:.1f}s); {len(info['seeds'])} seed points", flush=True)
        return state

    def sampler_space(self, state: RoundState) -> LevelSpace:
        """The round's space as data (levels, unit parameter counts, budget band) for budget-aware samplers."""
        space = self._space(state.space_path)
        weights = json.loads((self.root / MODEL_FILE).read_text())["unit_params"]
        params = tuple(LevelParam(u, 0, len(levels) - 1, levels, float(weights[u])) for u, levels in space.unit_levels)
        return LevelSpace(params, LevelBudget(space.budget.target, space.budget.tolerance))

    def after_round(self, state: RoundState, trials: pd.DataFrame) -> RoundState:
        """Projector optimisation under this round's top policies, then space evolution."""
        ok = trials[(trials["round"] == state.round) & (trials["status"] == STATUS_OK)]
        ok = ok.sort_values("objective", ascending=False)
        cols = [c for c in ok.columns if c.startswith("policy/")]
        k = max(self.config.projector.top_k, self.config.evolution.top_k)
        top = [{c.split("/", 1)[1]: float(row[c]) for c in cols} for _, row in ok.head(k).iterrows()]
        nxt = run_heavy(self.config, advance_round, self.config, str(self.root), state, top)
        # The next round starts from this round's best policies (on its evolved levels), not from scratch.
        study = open_study(ExperimentDir(self.root), nxt.round)
        if not study.trials:
            space = self._space(nxt.space_path)
            keep = min(SEEDS_FROM_PREVIOUS_ROUND, max(1, self.config.search.trials_per_round // 2))
            for rank, policy in enumerate(top[:keep]):
                try:
                    point = policy_indices(PruningPolicy.from_mapping(policy), space)
                except PolicyError:  # a level the evolved space dropped
                    continue
                study.enqueue_trial(point, user_attrs={"baseline": f"round-{state.round}-top{rank + 1}"})
        return nxt



