"""The LLaVA pruning problem: per-unit sparsity levels under a budget, scored by fidelity - SRM gap.

Driver side (experiment directory): `spaces/round-<r>.yaml` (every unit's levels written out),
`projector/projector-<v>.safetensors` (+ .json with its few-shot loss) and `model.json` (the
model's decoder layers and each unit's parameter count, read once from a worker). A round's
payload names them by relative path. Worker side: a `WorkerSession` per worker holds the model,
the bank and the round's scorer; projector training and the held-out check run there too.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from efficientllava.allocations import seed_points
from efficientllava.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from efficientllava.config import ExperimentConfig
from efficientllava.errors import DataError, PolicyError
from efficientllava.evolution import describe_evolution, evolve_space
from efficientllava.log import get_logger
from efficientllava.policy import PruningPolicy
from efficientllava.problem.rounds import heldout_entries, train_projector
from efficientllava.problem.session import (
    CHECKPOINT_PROJECTOR,
    RoundInputs,
    WorkerSession,
    bank_cache_dir,
    resolved_space,
)
from efficientllava.pruning.reconstruction import reconstruction_errors
from efficientllava.pruning.units import prunable_units
from efficientllava.search.api import (
    ATTRIBUTION_PREFIX,
    DEFAULT_OBJECTIVES,
    METRIC,
    POLICY_PREFIX,
    DriverContext,
    LocalContext,
    Objective,
    Param,
    RoundState,
    Space,
    SpaceBudget,
    TrialStatus,
)
from efficientllava.search.samplers import uses_attribution
from efficientllava.space import SearchSpace, load_space, policy_indices, space_from_dict

log = get_logger(__name__)
MODEL_FILE = "model.json"
FIRST_SPACE = "spaces/round-0.yaml"
FIRST_SEEDS = "seeds/round-0.json"
FIRST_ERRORS = "errors/round-0.json"  # each unit's reconstruction error per level (round 0's bank)
SEEDS_FROM_PREVIOUS_ROUND = 3  # a round > 0 starts from this many of the previous round's best policies


def _write_seeds(path: Path, points: Mapping[str, Mapping[str, int]]) -> None:
    """Named seed points as a JSON list, best first: the order is what `seed_points` keeps (a JSON object's
    keys would be sorted on writing, which once put uniform last and cut it from short rounds)."""
    write_json_atomic(path, [{"name": name, "point": dict(point)} for name, point in points.items()])


def _read_seeds(path: Path) -> dict[str, dict[str, int]]:
    """Seed points in their written order (an experiment written before the list format: its object's order)."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        return data
    return {entry["name"]: entry["point"] for entry in data}


def _write_errors(path: Path, errors: Mapping[str, Mapping[float, float]]) -> None:
    """The reconstruction-error table as `{unit: [[level, error], ...]}` (JSON keys cannot be floats)."""
    write_json_atomic(path, {u: [[float(lv), float(e)] for lv, e in sorted(curve.items())] for u, curve in errors.items()})


def _read_errors(path: Path) -> dict[str, dict[float, float]]:
    """Read back `_write_errors`."""
    return {u: {float(lv): float(e) for lv, e in curve} for u, curve in json.loads(path.read_text()).items()}


def _write_space(space: SearchSpace, path: Path) -> None:
    """A space YAML that `load_space` reads back to an equal space (atomic: resume reads it)."""
    write_text_atomic(path, yaml.safe_dump(space.to_dict(), sort_keys=False))


class PruningProblem:
    """SearchProblem for LLaVA-family pruning policies (see efficientllava.search.api.SearchProblem)."""

    objectives: tuple[Objective, ...] = DEFAULT_OBJECTIVES

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self._session: WorkerSession | None = None
        self._spaces: dict[Path, SearchSpace] = {}
        self._errors: dict[Path, dict[str, dict[float, float]]] = {}
        # Attributions cost a backward pass per trial: computed only for a sampler that reads them.
        self._attribution = uses_attribution(config.search.sampler)

    @staticmethod
    def check_config(config: ExperimentConfig) -> None:
        """Before Ray starts and the directory exists: the space parses, the model spec resolves (no download)
        and a local data source exists."""
        load_space(config.space)
        if config.model.spec != "tiny":
            from efficientllava.models.loading import resolve_spec

            resolve_spec(config.model.spec)
        source = config.data.source
        if source is not None:
            from efficientllava.data.sources import is_hub_id

            if not is_hub_id(source) and not Path(source).expanduser().exists():
                raise DataError(f"data.source={source!r}: no such file or directory; pass a local path or a "
                                "Hub dataset id (owner/name)")

    # -- driver side ----------------------------------------------------------------------------

    def _search_space(self, state: RoundState, ctx: DriverContext) -> SearchSpace:
        """The round's SearchSpace, read from its YAML (cached per file)."""
        path = ctx.root / state.payload["space"]
        if path not in self._spaces:
            self._spaces[path] = load_space(path)
        return self._spaces[path]

    def _unit_params(self, ctx: DriverContext) -> dict[str, int]:
        """Each unit's parameter count (model.json)."""
        return {u: int(n) for u, n in json.loads((ctx.root / MODEL_FILE).read_text())["unit_params"].items()}

    def initial_state(self, ctx: DriverContext) -> RoundState:
        """Round 0: the configured space resolved for the model's layers (read on a worker), the checkpoint's projector."""
        configured = load_space(self.config.space)
        facts = ctx.call("model_facts", configured.granularity)
        write_json_atomic(ctx.root / MODEL_FILE, facts)
        space = resolved_space(configured, int(facts["num_layers"]))
        _write_space(space, ctx.root / FIRST_SPACE)
        payload: dict[str, Any] = {"space": FIRST_SPACE, "projector": None, "projector_version": 0}
        if self.config.search.uniform_first:
            # Uniform, error DP, OWL, depth slopes and attention/MLP splits at the budget (allocations.py):
            # round 0's first trials, so every search starts from the allocations it must beat. They need the
            # model, activations and a bank, so they are computed once on a worker and kept in the directory.
            known = ctx.call("known_allocations", space.to_dict())
            _write_seeds(ctx.root / FIRST_SEEDS, known["seeds"])
            payload["seeds"] = FIRST_SEEDS
            if known.get("errors"):  # carried to every round's payload: the guided sampler's damage curves
                _write_errors(ctx.root / FIRST_ERRORS, known["errors"])
                payload["errors"] = FIRST_ERRORS
        return RoundState(0, payload)

    def space(self, state: RoundState, ctx: DriverContext) -> Space:
        """One ordinal parameter per unit: the index of its level; weight = the unit's parameter count; errors =
        its reconstruction error per level (round 0's table, where it covers the unit's levels)."""
        space, weights = self._search_space(state, ctx), self._unit_params(ctx)
        table = self._error_table(state, ctx)

        def errors(u: str, levels: Sequence[float]) -> tuple[float, ...] | None:
            curve = table.get(u, {})
            return tuple(curve[lv] for lv in levels) if all(lv in curve for lv in levels) else None

        params = tuple(Param(u, 0, len(levels) - 1, levels=levels, weight=float(weights[u]),
                             errors=errors(u, levels)) for u, levels in space.unit_levels)
        return Space(params, SpaceBudget(space.budget.target, space.budget.tolerance))

    def _error_table(self, state: RoundState, ctx: DriverContext) -> dict[str, dict[float, float]]:
        """The reconstruction-error table the round's payload names (empty when none was computed)."""
        rel = state.payload.get("errors")
        if not rel:
            return {}
        path = ctx.root / rel
        if path not in self._errors:
            self._errors[path] = _read_errors(path)
        return self._errors[path]

    def seed_points(self, state: RoundState, ctx: DriverContext) -> dict[str, dict[str, int]]:
        """The round's first trials: round 0 the known allocations (uniform first), a later round the previous
        round's best policies on its evolved levels; at most half the round, so the sampler has trials of its own."""
        rel = state.payload.get("seeds")
        if not rel:
            return {}
        points = _read_seeds(ctx.root / rel)
        keep = max(1, self.config.search.trials_per_round // 2)
        return dict(list(points.items())[:keep])

    def round_inputs(self, state: RoundState, ctx: DriverContext) -> RoundInputs:
        """The round's space, the bank's space, and the projector weights, read from the experiment directory."""
        space = self._search_space(state, ctx)
        first = load_space(ctx.root / FIRST_SPACE)
        projector, digest = None, None
        if state.payload.get("projector"):
            path = ctx.root / state.payload["projector"]
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                projector = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        rebuild = self.config.projector.rebuild_bank
        return RoundInputs(
            round=state.round, space=space.to_dict(), bank_space=(space if rebuild else first).to_dict(),
            projector=projector, projector_version=int(state.payload.get("projector_version", 0)),
            # A bank calibrated with a trained projector is keyed by the projector's content (banks are
            # shared by every search on the node), the checkpoint's own by 0.
            bank_tag=int(digest[:12], 16) if rebuild and digest else CHECKPOINT_PROJECTOR, projector_hash=digest,
        )

    def after_round(self, state: RoundState, trials: pd.DataFrame, ctx: DriverContext) -> RoundState:
        """Projector optimisation (on a worker) under this round's top policies, then space evolution."""
        cfg = self.config
        ok = trials[(trials["round"] == state.round) & (trials["status"] == TrialStatus.COMPLETE.value)]
        ok = ok.sort_values(METRIC, ascending=False)
        cols = [c for c in ok.columns if c.startswith(POLICY_PREFIX)]
        k = max(cfg.projector.top_k, cfg.evolution.top_k)
        top = [{c[len(POLICY_PREFIX):]: float(row[c]) for c in cols} for _, row in ok.head(k).iterrows()]
        payload = dict(state.payload)
        nxt = state.round + 1
        if cfg.projector.enabled and top and cfg.projector.steps > 0:
            payload.update(self._next_projector(state, top[: cfg.projector.top_k], ctx))
        space = self._search_space(state, ctx)
        if cfg.evolution.enabled and top:
            policies = [PruningPolicy.from_mapping(p) for p in top[: cfg.evolution.top_k]]
            evolved = evolve_space(space, policies, cfg.evolution.margin, self._unit_params(ctx))
            before = sum(len(lv) for _, lv in space.unit_levels)
            after = sum(len(lv) for _, lv in evolved.unit_levels)
            log.info(f"round {state.round}: space evolved around the top-{len(policies)} policies: "
                     f"{before} -> {after} unit levels")
            log.debug("space evolution:\n%s", describe_evolution(space, evolved))
            space = evolved
        rel_space = f"spaces/round-{nxt}.yaml"
        _write_space(space, ctx.root / rel_space)
        payload["space"] = rel_space
        # The next round starts from this round's best policies (those its evolved levels still hold).
        seeds: dict[str, dict[str, int]] = {}
        for rank, policy in enumerate(top[:SEEDS_FROM_PREVIOUS_ROUND]):
            try:
                seeds[f"round-{state.round}-top{rank + 1}"] = policy_indices(PruningPolicy.from_mapping(policy), space)
            except PolicyError:  # a level the evolved space dropped
                continue
        rel_seeds = f"seeds/round-{nxt}.json"
        _write_seeds(ctx.root / rel_seeds, seeds)
        payload["seeds"] = rel_seeds
        return RoundState(nxt, payload)

    def _next_projector(self, state: RoundState, top: list[dict[str, float]], ctx: DriverContext) -> dict[str, Any]:
        """The next round's projector payload: a new version when training lowered the few-shot loss, else the
        current one. A version already trained after this round (a resume after a crash) is reused, not retrained."""
        version = int(state.payload.get("projector_version", 0)) + 1
        rel = f"projector/projector-{version}.safetensors"
        meta_path = ctx.root / f"projector/projector-{version}.json"
        meta = None
        if meta_path.is_file() and (ctx.root / rel).is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                meta = None
        if meta is not None and meta.get("round") == state.round:
            log.info(f"round {state.round}: projector v{version} was already trained after this round; reused")
        else:
            trained = ctx.call("train_projector", top)
            meta = {"round": state.round, "version": version, "loss_before": trained["loss_before"],
                    "loss_after": trained["loss_after"], "steps": trained["steps"], "seconds": trained["seconds"],
                    "policies": top, "adopted": trained["loss_after"] < trained["loss_before"]}
            if meta["adopted"]:  # the weights first: the .json beside them says they are complete
                write_bytes_atomic(ctx.root / rel, save_safetensors(
                    trained["state_dict"], metadata={"format": "pt", "content": "llava-projector"}))
            write_json_atomic(ctx.root / f"projector/projector-{version}.json", meta)
            log.info(f"round {state.round}: projector v{version}: few-shot loss {trained['loss_before']:.4f} -> "
                     f"{trained['loss_after']:.4f} under top-{len(top)} policies ({trained['seconds']:.1f}s)")
        if not meta.get("adopted", True):
            log.warning(f"round {state.round}: projector update not adopted (few-shot loss {meta['loss_before']:.4f} -> "
                        f"{meta['loss_after']:.4f} did not go down); round {state.round + 1} keeps projector "
                        f"v{version - 1}")
            return {}
        return {"projector": rel, "projector_version": version}

    def heldout(self, states: Sequence[RoundState], best: Mapping[str, Any],
                ctx: DriverContext) -> dict[str, dict[str, Any]]:
        """Held-out accuracy of dense, uniform-at-budget and the best policy (on a worker)."""
        best_state = RoundState(int(best["round"]), best["state"])
        result = best.get("result") or {}
        summary = {"round": best["round"], "number": best["number"], "objective": best["objective"],
                   "accuracy": result.get("accuracy"),
                   "policy": {k[len(POLICY_PREFIX):]: v for k, v in result.items() if k.startswith(POLICY_PREFIX)}}
        first = self.round_inputs(states[0], ctx)
        return dict(ctx.call("heldout_entries", first, self.round_inputs(best_state, ctx), summary))

    # -- worker side ----------------------------------------------------------------------------

    @property
    def session(self) -> WorkerSession:
        """This worker's heavy state (the model is loaded on first use, once)."""
        if self._session is None:
            self._session = WorkerSession(self.config)
        return self._session

    def worker_stats(self) -> dict[str, Any]:
        """Model loads in this worker's process and the seconds they took."""
        return {"model_loads": WorkerSession.loads,
                "load_s": self._session.load_s if self._session is not None else None}

    def model_facts(self, granularity: str) -> dict[str, Any]:
        """The model's decoder layers and each unit's parameter count at `granularity`."""
        pipeline = self.session.pipeline
        return {"num_layers": pipeline.num_layers, "granularity": granularity,
                "unit_params": pipeline.cost_model(granularity).unit_param_counts()}

    def known_allocations(self, space: dict[str, Any]) -> dict[str, Any]:
        """Uniform, error DP, OWL, depth slopes and attention/MLP splits on `space` (round 0's) as level indices
        (`seeds`), and the reconstruction-error table error DP read (`errors`, `{unit: {level: error}}`).

        Error DP reads round 0's bank (the checkpoint's projector, the space's levels): it is built
        here, once, and round 0 then opens the same bank (`allocations.py`, `pruning.reconstruction`).
        """
        session = self.session
        pipeline = session.pipeline
        resolved = space_from_dict(space)
        weights = pipeline.cost_model(resolved.granularity).unit_param_counts()
        if not self.config.search.error_dp:
            return {"seeds": seed_points(pipeline.model, pipeline.fewshot_batches, resolved, weights), "errors": {}}
        session.set_projector(None)  # round 0 calibrates with the checkpoint's projector
        try:
            t0 = time.perf_counter()
            bank = pipeline.bank(resolved, bank_cache_dir(), CHECKPOINT_PROJECTOR, log=False)
            t1 = time.perf_counter()
            units = prunable_units(pipeline.model, resolved.granularity)
            errors = reconstruction_errors(pipeline.model, pipeline.fewshot_batches, bank, units)
            points = seed_points(pipeline.model, pipeline.fewshot_batches, resolved, weights, errors=errors)
            log.info(f"round 0: variant bank {bank.fingerprint} ready in {t1 - t0:.1f}s, seed points in "
                     f"{time.perf_counter() - t1:.1f}s (error DP read its "
                     f"{sum(len(bank.nonzero_levels(u)) for u in bank.unit_levels)} variants)")
            return {"seeds": points, "errors": errors}
        finally:
            if session.inputs is not None:  # a live round's projector goes back in
                session.set_projector(session.inputs.projector)

    def enter_round(self, state: RoundState, inputs: RoundInputs) -> None:
        """Swap in the round's projector and space (and its bank, when rebuilt per projector)."""
        self.session.enter(inputs)

    def evaluate(self, params: Mapping[str, int], state: RoundState) -> dict[str, Any]:
        """Score the policy that `params` name: every term, the policy, and provenance."""
        session = self.session
        if session.inputs is None or session.inputs.round != state.round or session.scorer is None:
            raise RuntimeError(f"worker is not in round {state.round}; enter_round first")
        raw, policy = session.policy(params)
        score = session.scorer.score(policy, attribution=self._attribution)
        return {
            **score.as_dict(),
            **{f"{POLICY_PREFIX}{u}": r for u, r in policy.ratios},
            **{f"{ATTRIBUTION_PREFIX}{u}": a for u, a in score.attribution},
            "policy_key": policy.key,
            "repaired": policy != raw,
            "projector_version": session.inputs.projector_version,
            "bank": session.scorer.bank.fingerprint,
            "fewshot": session.pipeline.task.fingerprint,  # the data fingerprint
            "kind": session.pipeline.task.kind,  # multiple_choice | open_ended | unlabelled
        }

    def train_projector(self, policies: Sequence[Mapping[str, float]]) -> dict[str, Any]:
        """Optimise the projector under `policies`; its new weights and losses (see problem.rounds)."""
        return train_projector(self.session, policies)

    def heldout_entries(self, first: RoundInputs, best_inputs: RoundInputs,
                        best: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The held-out comparison (see problem.rounds)."""
        return heldout_entries(self.session, first, best_inputs, best)


def open_trial_session(cfg: ExperimentConfig, root: str | Path, record: Mapping[str, Any]) -> WorkerSession:
    """In this process: the model with the round of trial `record` entered (its projector and bank)."""
    problem = PruningProblem(cfg)
    state = RoundState(int(record["round"]), record.get("state") or {})
    problem.enter_round(state, problem.round_inputs(state, LocalContext(root, problem)))
    return problem.session


