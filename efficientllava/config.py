"""Experiment configuration: frozen dataclasses, loaded from YAML and validated at the boundary."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from efficientllava.data.config import DataConfig
from efficientllava.errors import ConfigError, ResourceError
from efficientllava.scoring import FIDELITIES
from efficientllava.scoring.srm import AGGREGATES

DEFAULT_PROBLEM = "efficientllava.problem:PruningProblem"
DTYPES = ("auto", "float32", "float16", "bfloat16")


def sampler_names() -> tuple[str, ...]:
    """The registered samplers (read from the registry, so a plug-in sampler is a valid choice)."""
    from efficientllava.search.samplers import sampler_names as names

    return names()


def dataset_names() -> tuple[str, ...]:
    """The data sets the loaders know (read from efficientllava.data)."""
    from efficientllava.data import DATASETS

    return tuple(DATASETS)


Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]


def kind_names() -> tuple[str, ...]:
    """The kinds of task a data set may hold (read from efficientllava.data)."""
    from efficientllava.data import KINDS

    return tuple(KINDS)


def _rule(*, choices: Choices | None = None, ge: float | None = None, gt: float | None = None,
          le: float | None = None) -> dict[str, Any]:
    """Field metadata for `_check_value`: allowed choices (or a registry lookup) and numeric bounds."""
    return {"choices": choices, "ge": ge, "gt": gt, "le": le}


@dataclass(frozen=True)
class ModelConfig:
    """Which LLaVA checkpoint to load ("tiny" = the built-in tiny model) and where."""

    spec: str = "tiny"
    dtype: str = field(default="auto", metadata=_rule(choices=DTYPES))
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...


@dataclass(frozen=True)
class ObjectiveConfig:
    """The fitness: a few-shot fidelity signal minus lam x the SRM generalisation-gap penalty."""

    fidelity: str = field(default="kl", metadata=_rule(choices=FIDELITIES))  # accuracy | loglik | kl
    lam: float = field(default=0.0, metadata=_rule(ge=0))  # 0: the SRM term did not help (benchmarks/search_quality.py)
    delta: float = field(default=0.05, metadata=_rule(gt=0, le=1))
    scale: float = field(default=1.0, metadata=_rule(gt=0))
    aggregate: str = field(default="geometric_mean", metadata=_rule(choices=AGGREGATES))


@dataclass(frozen=True)
class SearchConfig:
    """Rounds, trials per round, concurrency and sampler of the policy search."""

    rounds: int = field(default=2, metadata=_rule(ge=1))
    trials_per_round: int = field(default=24, metadata=_rule(ge=1))
    max_concurrent: int = field(default=2, metadata=_rule(ge=1))
    seed: int = 0
    # The attribution-guided DP (budget-preserving evolution until trials report attributions): the best held-out
    # policies at an equal trial budget in benchmarks/search_quality.py (README, Search quality).
    sampler: str = field(default="guided", metadata=_rule(choices=sampler_names))
    n_startup_trials: int = field(default=8, metadata=_rule(ge=0))
    uniform_first: bool = True  # round 0 starts with the uniform policy at the budget (the baseline)
    # ... and error DP (allocations.error_dp) next: its table reads every variant of round 0's bank once,
    # so a lazily built bank (SparseGPT's) is built in full before round 0; false skips it.
    error_dp: bool = True


@dataclass(frozen=True)
class ProjectorConfig:
    """Projector optimisation between rounds (the paper's search-space evolution)."""

    enabled: bool = True
    steps: int = field(default=60, metadata=_rule(ge=0))
    lr: float = field(default=1e-3, metadata=_rule(gt=0))
    top_k: int = field(default=3, metadata=_rule(ge=1))
    batch_size: int = field(default=16, metadata=_rule(ge=1))  # few-shot samples per backward pass
    weight_decay: float = field(default=0.0, metadata=_rule(ge=0))
    # Re-calibrate and re-prune the variants with each new projector. Off by default: on the tiny
    # model keeping round 0's pruned weights did better (held-out 0.936 vs 0.888, benchmarks/projector_round.py),
    # and one bank per search is what makes a 7B search fit on disk.
    rebuild_bank: bool = False


@dataclass(frozen=True)
class EvolutionConfig:
    """Search-space evolution: narrow each unit's levels around the top-k policies."""

    enabled: bool = True
    top_k: int = field(default=5, metadata=_rule(ge=1))
    margin: int = field(default=1, metadata=_rule(ge=0))


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-trial Ray resources (fractional GPUs allowed, e.g. 0.5 = two trials per GPU)."""

    cpu: float = field(default=1.0, metadata=_rule(ge=0))
    gpu: float = field(default=0.0, metadata=_rule(ge=0))


@dataclass(frozen=True)
class EvalConfig:
    """How candidates are evaluated."""

    batch_size: int = field(default=32, metadata=_rule(ge=1))
    # Token cap of greedy answers: the held-out check of open-ended / unlabelled tasks, and the dense
    # model's answers that an unlabelled task's few-shot fidelity is measured against.
    max_new_tokens: int = field(default=16, metadata=_rule(ge=1))


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole experiment, as read from its YAML (see `load_config`)."""

    name: str
    space: str  # absolute path of the search-space YAML (resolved at load)
    problem: str = DEFAULT_PROBLEM  # "module:Class" implementing efficientllava.search.api.SearchProblem
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    search: SearchConfig = SearchConfig()
    projector: ProjectorConfig = ProjectorConfig()
    evolution: EvolutionConfig = EvolutionConfig()
    resources: ResourcesConfig = ResourcesConfig()
    storage: str = "runs"  # local directory or URI (s3://, gs://) under which experiments are created
    eval: EvalConfig = EvalConfig()


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PROBLEM_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# Extra checks on DataConfig, which lives in efficientllava.data and carries no field metadata.
_DATA_RULES = {"dataset": _rule(choices=dataset_names), "n_shots": _rule(ge=1), "heldout_size": _rule(ge=1),
               "kind": _rule(choices=kind_names)}


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML; the space path resolves relative to the YAML's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read experiment config ({exc.strerror}); check the path") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping with at least `space:`")
    return config_from_dict(data, source=path)


def config_from_dict(d: Any, source: str | Path = "<config>", *, resolve_space: bool = True) -> ExperimentConfig:
    """Validate a plain mapping (as read from YAML) into an ExperimentConfig.

    `source` names the file in error messages and anchors the relative `space:` path; a missing
    `name:` defaults to the source file's stem. `resolve_space=False` keeps `space` as written
    (used when reopening an experiment whose original space file may have moved).
    """
    src = str(source)
    if not isinstance(d, dict):
        raise ConfigError(f"{src}: the top level must be a mapping of keys, got {type(d).__name__}")
    d = dict(d)
    if "name" not in d and src != "<config>":
        d["name"] = Path(src).stem
    cfg = _build(ExperimentConfig, d, src, "")
    if not _NAME_RE.match(cfg.name):
        raise ConfigError(f"{src}: name={cfg.name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    if not _PROBLEM_RE.match(cfg.problem):
        raise ConfigError(f"{src}: problem={cfg.problem!r} must be 'package.module:ClassName'")
    problem = cfg.data.problem()
    if problem is not None:
        raise ConfigError(f"{src}: {problem}")
    if cfg.data.kind == "unlabelled" and cfg.objective.fidelity != "kl":
        # (data whose kind is only known once read is checked when the workers open it)
        raise ConfigError(f"{src}: objective.fidelity: {cfg.objective.fidelity} needs answers, but data.kind is "
                          "unlabelled; use objective.fidelity: kl (agreement with the dense model)")
    if resolve_space:
        cfg = dataclasses.replace(cfg, space=str(_resolve_space(cfg.space, source, src)))
        if cfg.data.source is not None and src != "<config>":
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, source=_resolve_source(cfg.data.source, source)))
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as a plain nested mapping (what `config_from_dict` reads back)."""
    return dataclasses.asdict(cfg)


def check_resources(cfg: ExperimentConfig, cluster: dict[str, float] | None = None) -> None:
    """Fail fast when one trial asks for more CPU/GPU than the Ray cluster has (trials would hang PENDING)."""
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    for key, ray_key, what in (("gpu", "GPU", "GPU"), ("cpu", "CPU", "CPU")):
        want = float(getattr(cfg.resources, key))
        have = float(cluster.get(ray_key, 0.0))
        if want <= 0 or want <= have:
            continue
        if have == 0:
            raise ResourceError(
                f"resources.{key}={want:g} but the Ray cluster has no {what}; "
                f"set resources.{key}: 0 or run on a cluster with {what}s"
            )
        raise ResourceError(
            f"resources.{key}={want:g} per trial but the Ray cluster has only {have:g} {what}(s) in total; "
            f"set resources.{key} <= {have:g}"
        )


def _resolve_space(space: str, source: str | Path, src: str) -> Path:
    """Resolve `space:` relative to the config file's folder first, then the working directory."""
    p = Path(os.path.expanduser(space))
    candidates = [p] if p.is_absolute() else []
    if not p.is_absolute():
        if src != "<config>":
            candidates.append(Path(source).resolve().parent / p)
        candidates.append(Path.cwd() / p)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise ConfigError(f"{src}: space={space!r} is not a file (tried {tried}); point it at a search-space YAML")


def _resolve_source(data_source: str, source: str | Path) -> str:
    """A local data.source relative to the config file's folder, made absolute; anything else as written."""
    p = Path(os.path.expanduser(data_source))
    if not p.is_absolute() and (Path(source).resolve().parent / p).exists():
        return str((Path(source).resolve().parent / p).resolve())
    return data_source


def _build(cls: type, d: Any, src: str, prefix: str) -> Any:
    """Build dataclass `cls` from mapping `d`, checking keys, types and values; errors name `prefix.key`."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(d, dict):
        raise ConfigError(f"{src}: {where} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"{src}: unknown key {prefix}{unknown[0]}; allowed keys{' in ' + where if prefix else ''}: "
            f"{', '.join(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{src}: missing required key {key}")
            continue
        tp = hints[name]
        value = d[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, {} if value is None else value, src, key + ".")
            continue
        value = _check_type(value, tp, src, key)
        rules = f.metadata or (_DATA_RULES.get(name, {}) if cls is DataConfig else {})
        _check_value(value, rules, src, key)
        kwargs[name] = value
    return cls(**kwargs)


def _check_type(value: Any, tp: Any, src: str, key: str) -> Any:
    """Check a scalar against its annotation (int, float, bool, str, or `X | None`); ints pass as floats."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{src}: {key} must be a {base.__name__}, not empty/null")
    if typing.get_origin(base) is tuple:  # tuple[str, ...]: a YAML list of names, or one name
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{src}: {key}={value!r} must be a name or a list of names")
        return tuple(items)
    ok = (
        (base is bool and isinstance(value, bool))
        or (base is int and isinstance(value, int) and not isinstance(value, bool))
        or (base is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (base is str and isinstance(value, str))
    )
    if not ok:
        allowed = base.__name__ + (" or null" if optional else "")
        raise ConfigError(f"{src}: {key}={value!r} has the wrong type ({type(value).__name__}); expected {allowed}")
    return float(value) if base is float else value


def _check_value(value: Any, rules: Mapping[str, Any], src: str, key: str) -> None:
    """Check choices and numeric bounds from field metadata."""
    if value is None or not rules:
        return
    choices = rules.get("choices")
    if callable(choices):
        choices = choices()
    if choices and value not in choices:
        raise ConfigError(f"{src}: {key}={value!r} is not allowed; choose one of {', '.join(choices)}")
    for op, ok, text in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
    ):
        bound = rules.get(op)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{src}: {key}={value!r} is out of range; it must be {text} {bound:g}")
