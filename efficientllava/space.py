"""Search spaces: which units, which sparsity levels, which budget and pruning method (YAML-backed)."""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from efficientllava.errors import ConfigError, PolicyError
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.methods import MethodOptions, PruningMethod, get_method
from efficientllava.pruning.units import GRANULARITIES, is_unit, unit_granularity, unit_names, unit_sort_key

OVER_BUDGET = ("project", "repair", "penalize", "reject")
BUDGET_KINDS = ("sparsity",)
_PATTERN = re.compile(r"^(?:unstructured|(\d+):(\d+))$")
_EPS = 1e-9  # float tolerance for grids and level comparisons
_LEVEL_DIGITS = 10  # grid levels are rounded so 0.1 * 3 is stored as 0.3

_TOP_KEYS = ("name", "granularity", "levels", "unit_levels", "budget", "method", "pattern", "calibration")
_BUDGET_KEYS = ("kind", "target", "tolerance", "over_budget", "penalty")
_CALIB_KEYS = ("percdamp", "blocksize")  # the old `calibration:` section (SparseGPT's options), still read
_GRID_KEYS = ("start", "stop", "step")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """`None` for "unstructured", `(N, M)` for "N:M" with 0 < N < M; ConfigError otherwise."""
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ConfigError(f"pattern {pattern!r} is not 'unstructured' or 'N:M' (e.g. '2:4')")
    if match.group(1) is None:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"pattern {pattern!r} needs 0 < N < M")
    return n, m


def _check_levels(levels: tuple[float, ...], where: str, pattern: tuple[int, int] | None) -> None:
    """Levels: non-empty, numbers in [0, 1), and only 0 and N/M for an N:M pattern."""
    if not levels:
        raise ConfigError(f"{where} is empty; give at least one sparsity level in [0, 1)")
    for level in levels:
        if not _is_number(level) or not (math.isfinite(level) and 0.0 <= level < 1.0):
            raise ConfigError(f"{where} has level {level!r}; levels are numbers in [0, 1)")
    if pattern is not None:
        n, m = pattern
        allowed = (0.0, n / m)
        bad = [lv for lv in levels if not any(abs(lv - a) < _EPS for a in allowed)]
        if bad:
            raise ConfigError(
                f"{where} has level {bad[0]!r}, but pattern '{n}:{m}' only allows levels 0.0 and {n / m:g}"
            )


def _norm_levels(levels: Any) -> tuple[float, ...]:
    """Sorted, de-duplicated, rounded levels (no validation)."""
    return tuple(sorted({round(float(lv), _LEVEL_DIGITS) + 0.0 for lv in levels}))


@dataclass(frozen=True)
class Budget:
    """Cost constraint on the parameter-weighted mean sparsity: at least target - tolerance.

    `over_budget` says what a trial does with a policy that misses it: "project" (the default) moves
    every policy, under or over the budget, into the band target +- tolerance by the smallest change
    of its levels (see `project`), so every trial prunes exactly as much as asked, up to the
    tolerance; "repair" only raises under-budget policies (see `repair`); "penalize" subtracts
    `penalty * shortfall` from the objective; "reject" scores it as failed.
    """

    target: float
    tolerance: float = 0.01
    over_budget: str = "project"
    penalty: float = 1.0
    kind: str = "sparsity"

    def __post_init__(self) -> None:
        """Validate the constants."""
        if self.kind not in BUDGET_KINDS:
            raise ConfigError(f"budget.kind {self.kind!r} is not one of {', '.join(BUDGET_KINDS)}")
        if not _is_number(self.target) or not 0.0 < self.target < 1.0:
            raise ConfigError(f"budget.target {self.target!r} must be a number in (0, 1) (a mean sparsity)")
        if not _is_number(self.tolerance) or not 0.0 <= self.tolerance < self.target:
            raise ConfigError(f"budget.tolerance {self.tolerance!r} must be a number in [0, target)")
        if self.over_budget not in OVER_BUDGET:
            raise ConfigError(
                f"budget.over_budget {self.over_budget!r} is not one of {', '.join(OVER_BUDGET)}"
            )
        if not _is_number(self.penalty) or not (math.isfinite(self.penalty) and self.penalty >= 0):
            raise ConfigError(f"budget.penalty {self.penalty!r} must be a number >= 0")
        for name in ("target", "tolerance", "penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def floor(self) -> float:
        """The least mean sparsity that meets the budget."""
        return self.target - self.tolerance

    @property
    def ceiling(self) -> float:
        """The most mean sparsity that "project" lets a policy keep."""
        return self.target + self.tolerance

    def within(self, mean_sparsity: float) -> bool:
        """Whether a mean sparsity meets the budget (is at least the floor)."""
        return mean_sparsity >= self.floor - _EPS

    def in_band(self, mean_sparsity: float) -> bool:
        """Whether a mean sparsity lies in the band [floor, ceiling] that "project" scores at."""
        return self.floor - _EPS <= mean_sparsity <= self.ceiling + _EPS

    def satisfied(self, mean_sparsity: float) -> bool:
        """Whether a scored policy is at the budget: in the band for "project", above the floor otherwise."""
        return self.in_band(mean_sparsity) if self.over_budget == "project" else self.within(mean_sparsity)

    def shortfall_penalty(self, mean_sparsity: float) -> float:
        """`penalty * max(0, floor - mean)`: what "penalize" subtracts from the objective."""
        return self.penalty * max(0.0, self.floor - mean_sparsity)


@dataclass(frozen=True)
class SearchSpace:
    """What a search may choose: a level per unit, under a budget, pruned by one method and pattern.

    `method` names a registered pruning method; `method_options` are its options (a mapping is
    validated into the method's options dataclass; None gives its defaults).
    """

    granularity: str
    levels: tuple[float, ...]
    budget: Budget
    unit_levels: tuple[tuple[str, tuple[float, ...]], ...] = ()  # per-unit overrides (space evolution)
    method: str = "sparsegpt"
    pattern: str = "unstructured"
    method_options: MethodOptions | Mapping[str, Any] | None = None
    name: str = "space"
    _overrides: dict[str, tuple[float, ...]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        """Validate every field and normalise levels (sorted, unique)."""
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        object.__setattr__(self, "method_options", get_method(self.method, self.method_options).options)
        nm = parse_pattern(self.pattern)
        if not isinstance(self.budget, Budget):
            raise ConfigError(f"budget must be a Budget, got {type(self.budget).__name__}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name {self.name!r} must be a non-empty string")
        if not isinstance(self.levels, (list, tuple)):
            raise ConfigError(f"levels must be a list of numbers in [0, 1), got {type(self.levels).__name__}")
        _check_levels(tuple(self.levels), "levels", nm)
        object.__setattr__(self, "levels", _norm_levels(self.levels))
        overrides: dict[str, tuple[float, ...]] = {}
        pairs = self.unit_levels.items() if isinstance(self.unit_levels, Mapping) else self.unit_levels
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ConfigError(f"unit_levels entry {pair!r} is not a (unit, levels) pair")
            unit, levels = pair
            if not (isinstance(unit, str) and is_unit(unit) and unit_granularity(unit) == self.granularity):
                example = " / ".join(n.replace("layer.0", "layer.3") for n in unit_names(1, self.granularity))
                raise ConfigError(
                    f"unit_levels names unit {unit!r}, not a {self.granularity}-granularity unit like {example}"
                )
            if unit in overrides:
                raise ConfigError(f"unit_levels gives unit {unit!r} twice")
            if not isinstance(levels, (list, tuple)):
                raise ConfigError(f"unit_levels.{unit} must be a list of levels, got {type(levels).__name__}")
            _check_levels(tuple(levels), f"unit_levels.{unit}", nm)
            overrides[unit] = _norm_levels(levels)
        ordered = tuple(sorted(overrides.items(), key=lambda kv: unit_sort_key(kv[0])))
        object.__setattr__(self, "unit_levels", ordered)
        object.__setattr__(self, "_overrides", dict(ordered))

    @property
    def pruning_method(self) -> PruningMethod:
        """The configured pruning method (with its options)."""
        return get_method(self.method, self.method_options)

    @property
    def nm(self) -> tuple[int, int] | None:
        """`(N, M)` of an N:M pattern, `None` when unstructured."""
        return parse_pattern(self.pattern)

    def levels_for(self, unit: str) -> tuple[float, ...]:
        """The levels `unit` may take (its override, else the shared levels)."""
        return self._overrides.get(unit, self.levels)

    def unit_names(self, num_layers: int) -> list[str]:
        """Unit names, in model order, for a decoder of `num_layers` layers."""
        names = unit_names(num_layers, self.granularity)
        known = set(names)
        extra = [u for u, _ in self.unit_levels if u not in known]
        if extra:
            raise ConfigError(
                f"search space {self.name!r} has unit_levels for {extra[0]!r}, "
                f"but the model has {num_layers} decoder layers"
            )
        return names

    def with_unit_levels(self, mapping: Mapping[str, Any]) -> SearchSpace:
        """A copy whose per-unit levels are the current overrides updated with `mapping`."""
        merged = dict(self._overrides)
        merged.update({u: tuple(lv) for u, lv in mapping.items()})
        return replace(self, unit_levels=tuple(merged.items()))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict that `load_space` reads back to an equal space."""
        out: dict[str, Any] = {
            "name": self.name,
            "granularity": self.granularity,
            "levels": list(self.levels),
        }
        if self.unit_levels:
            out["unit_levels"] = {u: list(lv) for u, lv in self.unit_levels}
        out["budget"] = {
            "kind": self.budget.kind,
            "target": self.budget.target,
            "tolerance": self.budget.tolerance,
            "over_budget": self.budget.over_budget,
            "penalty": self.budget.penalty,
        }
        options = self.pruning_method.options.as_dict()
        out["method"] = {"name": self.method, **options} if options else self.method
        out["pattern"] = self.pattern
        return out


# -- YAML ---------------------------------------------------------------------------------------


def _grid(spec: Mapping[str, Any], where: str) -> list[float]:
    """Levels from `{start, stop, step}`, stop included within float tolerance."""
    for key in spec:
        if key not in _GRID_KEYS:
            raise ConfigError(f"{where} has unknown key {key!r}; a grid has {', '.join(_GRID_KEYS)}")
    for key in _GRID_KEYS:
        if key not in spec:
            raise ConfigError(f"{where} lacks {key!r}; a grid is {{start, stop, step}}")
        if not _is_number(spec[key]):
            raise ConfigError(f"{where}.{key} is {spec[key]!r}, not a number")
    start, stop, step = float(spec["start"]), float(spec["stop"]), float(spec["step"])
    if step <= 0 or stop < start:
        raise ConfigError(f"{where} needs step > 0 and stop >= start, got {dict(spec)}")
    count = int(math.floor((stop - start) / step + _EPS)) + 1
    return [round(start + i * step, _LEVEL_DIGITS) for i in range(count)]


def _levels_from_yaml(raw: Any, where: str) -> list[float]:
    if isinstance(raw, Mapping):
        return _grid(raw, where)
    if isinstance(raw, list):
        for level in raw:
            if not _is_number(level):
                raise ConfigError(f"{where} has {level!r}; levels are numbers in [0, 1)")
        return [float(lv) for lv in raw]
    raise ConfigError(f"{where} must be a list of numbers or {{start, stop, step}}, got {type(raw).__name__}")


def _section(raw: dict[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(
            f"{key} must be a mapping with keys {', '.join(allowed)}, got {type(value).__name__}"
        )
    for sub in value:
        if sub not in allowed:
            raise ConfigError(f"{key} has unknown key {sub!r}; allowed: {', '.join(allowed)}")
    return value


def _method_from_yaml(raw: Any, calibration: Mapping[str, Any]) -> tuple[str, MethodOptions]:
    """`method: <name>` or `method: {name: <name>, <option>: ...}`; the old `calibration:` keys fill options.

    Old space files carry `calibration: {percdamp, blocksize}` whatever the method; keys the method
    does not take are ignored there (they never applied), and `method:` options win over them.
    """
    if isinstance(raw, Mapping):
        if not isinstance(raw.get("name"), str):
            raise ConfigError(f"method {dict(raw)!r} needs a 'name' (a method name string)")
        name, given = raw["name"], {k: v for k, v in raw.items() if k != "name"}
    elif isinstance(raw, str):
        name, given = raw, {}
    else:
        raise ConfigError(f"method must be a method name or a mapping with 'name', got {raw!r}")
    fields = get_method(name).options.as_dict()
    legacy = {k: v for k, v in calibration.items() if k in fields}
    options = get_method(name, legacy, where="calibration").options.as_dict()
    options.update(given)
    return name, get_method(name, options, where="method").options


def space_from_dict(raw: Any, name: str = "space") -> SearchSpace:
    """Build a `SearchSpace` from a parsed YAML mapping (errors name the key, not the file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a search space is a mapping with keys {', '.join(_TOP_KEYS)}")
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(f"unknown key {key!r}; allowed: {', '.join(_TOP_KEYS)}")
    for key in ("granularity", "levels", "budget"):
        if key not in raw:
            raise ConfigError(f"missing key {key!r}")
    for key in ("granularity", "pattern", "name"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"{key} must be a string, got {raw[key]!r}")
    budget_raw = _section(raw, "budget", _BUDGET_KEYS)
    if "target" not in budget_raw:
        raise ConfigError("budget lacks 'target' (the least mean sparsity, in (0, 1))")
    method, options = _method_from_yaml(raw.get("method", "sparsegpt"), _section(raw, "calibration", _CALIB_KEYS))
    unit_raw = raw.get("unit_levels") or {}
    if not isinstance(unit_raw, dict):
        raise ConfigError(
            f"unit_levels must be a mapping of unit -> list of levels, got {type(unit_raw).__name__}"
        )
    unit_levels = tuple(
        (str(u), tuple(_levels_from_yaml(lv, f"unit_levels.{u}"))) for u, lv in unit_raw.items()
    )
    return SearchSpace(
        granularity=raw["granularity"],
        levels=tuple(_levels_from_yaml(raw["levels"], "levels")),
        budget=Budget(**budget_raw),
        unit_levels=unit_levels,
        method=method,
        pattern=raw.get("pattern", "unstructured"),
        method_options=options,
        name=raw.get("name", name),
    )


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML; every error names the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read search space {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"search space {path} is not valid YAML: {problem}{where}") from None
    try:
        return space_from_dict(raw, name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f"search space {path}: {exc}") from None


def dump_space(space: SearchSpace, path: str | Path) -> Path:
    """Write `space` as YAML that `load_space` reads back to an equal space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    return path


# -- budget -------------------------------------------------------------------------------------


def budget_status(policy: PruningPolicy, budget: Budget, weights: Mapping[str, int]) -> tuple[float, bool]:
    """`(parameter-weighted mean sparsity, whether it meets the budget)`."""
    mean = policy.mean_sparsity(weights)
    return mean, budget.within(mean)


def _shift(ratio: float, levels: tuple[float, ...], steps: int) -> float:
    """`ratio` moved `steps` levels up its level list, clipped at the top, never lowered."""
    if steps == 0:
        return ratio
    below = sum(1 for lv in levels if lv <= ratio + _EPS) - 1  # index of the level at/below ratio
    return max(ratio, levels[min(below + steps, len(levels) - 1)])


def repair(policy: PruningPolicy, space: SearchSpace, weights: Mapping[str, int]) -> PruningPolicy:
    """Raise an under-budget policy's levels until it meets `space.budget`; others are returned as is.

    Why: TPE samples each unit's level independently, so most raw samples of a many-unit space
    miss a mean-sparsity budget (the mean of independent draws concentrates on the middle of the
    grid). Rejecting them would waste most trials; repairing maps each sample to a nearby
    feasible policy and keeps the sampler's *relative* choices (which units to prune harder).

    Rule: every unit moves up the same number `k` of steps on its own level list (clipped at its
    highest level), with the smallest `k` that meets the budget. Deterministic, monotone (never
    lowers a ratio), and it keeps the units' relative order. Raises PolicyError when even every
    unit at its highest level misses the budget (the space cannot reach it).
    """
    mean, ok = budget_status(policy, space.budget, weights)
    if ok:
        return policy
    level_lists = {u: space.levels_for(u) for u in policy.units}
    max_steps = max(len(lv) for lv in level_lists.values())
    for steps in range(1, max_steps + 1):
        candidate = PruningPolicy(tuple((u, _shift(r, level_lists[u], steps)) for u, r in policy.ratios))
        mean, ok = budget_status(candidate, space.budget, weights)
        if ok:
            return candidate
    raise PolicyError(
        f"search space {space.name!r} cannot meet its budget: with every unit at its highest level the "
        f"mean sparsity is {mean:.4f} < {space.budget.floor:.4f} (target - tolerance); "
        "add higher levels or lower budget.target"
    )


def uniform_level(space: SearchSpace, unit: str) -> float:
    """The smallest level of `unit` that meets the budget floor when every unit takes it."""
    levels = [lv for lv in space.levels_for(unit) if lv >= space.budget.floor - 1e-9]
    if not levels:
        raise ConfigError(f"search space {space.name!r}: no level of {unit} reaches the budget floor "
                          f"{space.budget.floor:g}, so there is no uniform baseline")
    return min(levels)


# -- budget projection --------------------------------------------------------------------------


def _nearest_index(levels: Sequence[float], ratio: float) -> int:
    """Index of the level nearest `ratio` (the lower one on a tie)."""
    return min(range(len(levels)), key=lambda i: (abs(levels[i] - ratio), i))


def project_indices(levels: Sequence[Sequence[float]], index: Sequence[int], weights: Sequence[float],
                    lo: float, hi: float, *, anchor: Sequence[float] | None = None,
                    frozen: Collection[int] = (), names: Sequence[str] | None = None) -> list[int]:
    """Level indices moved, one level step at a time, until the weighted mean level lies in [lo, hi].

    Each step goes in the one direction the mean must move (up when below `lo`, down when above
    `hi`). The next step is the one that adds the least squared distance to `anchor` (default: the
    starting levels) per unit of mean it moves, i.e. ((new - a)^2 - (old - a)^2) / (weight * |new - old|):
    a greedy walk toward the weighted least-squares projection onto the band, so the change spreads
    over units in proportion to their weight instead of piling onto one. A step that would jump
    past the band's far edge is never taken. Ties go to the unit listed first. `frozen` units never
    move. Deterministic, and the identity on a point already in the band. Raises PolicyError when
    no sequence of such steps reaches the band.
    """
    n = len(levels)
    names = list(names) if names is not None else [f"#{i}" for i in range(n)]
    total = math.fsum(weights)
    idx = list(index)
    mean = math.fsum(w * lv[k] for w, lv, k in zip(weights, levels, idx, strict=True)) / total
    if lo - _EPS <= mean <= hi + _EPS:
        return idx
    up = mean < lo
    step = 1 if up else -1
    ref = list(anchor) if anchor is not None else [lv[k] for lv, k in zip(levels, idx, strict=True)]

    def entry(i: int) -> tuple[float, int] | None:
        nxt = idx[i] + step
        if i in frozen or not 0 <= nxt < len(levels[i]):
            return None
        old, new = levels[i][idx[i]], levels[i][nxt]
        cost = ((new - ref[i]) ** 2 - (old - ref[i]) ** 2) / (weights[i] * abs(new - old))
        return round(cost, 12), i

    heap = [e for e in (entry(i) for i in range(n)) if e is not None]
    heapq.heapify(heap)
    too_big: list[int] = []  # units whose next step jumps over the band (for the error message)
    while heap and not lo - _EPS <= mean <= hi + _EPS:
        _, i = heapq.heappop(heap)
        moved = weights[i] * (levels[i][idx[i] + step] - levels[i][idx[i]]) / total
        if (up and mean + moved > hi + _EPS) or (not up and mean + moved < lo - _EPS):
            too_big.append(i)  # only gets worse as the mean keeps moving the same way
            continue
        idx[i] += step
        mean += moved
        nxt = entry(i)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    mean = math.fsum(w * lv[k] for w, lv, k in zip(weights, levels, idx, strict=True)) / total
    if lo - _EPS <= mean <= hi + _EPS:
        return idx
    if too_big:
        unit = names[too_big[0]]
        raise PolicyError(
            f"the budget band [{lo:.4f}, {hi:.4f}] is narrower than one level step of {unit}; "
            "raise budget.tolerance (see space.min_tolerance)"
        )
    edge = "highest" if up else "lowest"
    raise PolicyError(
        f"the budget band [{lo:.4f}, {hi:.4f}] is out of reach: with every movable unit at its {edge} level "
        f"the mean sparsity is {mean:.4f}; change the levels or budget.target"
    )


def project(policy: PruningPolicy, space: SearchSpace, weights: Mapping[str, int]) -> PruningPolicy:
    """The policy on `space`'s levels nearest `policy` whose mean sparsity lies in the budget band.

    Why: samplers choose each unit's level independently, so raw samples land anywhere between the
    lowest and highest mean; a policy scored above the budget wins by pruning less than asked, one
    below it is compared unfairly with uniform. Projecting both ways puts every scored policy at
    the budget (target +- tolerance), so every trial row compares with uniform at the same size.

    Rule (see `project_indices`): off-grid ratios are first snapped to their nearest level; then
    single level steps, up or down as needed, each the one that moves the policy least (squared
    distance per unit of mean sparsity gained), until the mean is in the band. Deterministic and
    idempotent; it raises PolicyError when the band cannot be reached.
    """
    units = policy.units
    levels = [space.levels_for(u) for u in units]
    ratios = [r for _, r in policy.ratios]
    idx = [_nearest_index(lv, r) for lv, r in zip(levels, ratios, strict=True)]
    on_grid = all(abs(lv[k] - r) < _EPS for lv, k, r in zip(levels, idx, ratios, strict=True))
    missing = [u for u in units if u not in weights]
    if missing:
        raise PolicyError(f"no parameter count for unit {missing[0]!r}; weights must cover every unit")
    w = [float(weights[u]) for u in units]
    budget = space.budget
    try:
        new = project_indices(levels, idx, w, budget.floor, budget.ceiling, anchor=ratios, names=units)
    except PolicyError as exc:
        raise PolicyError(f"search space {space.name!r}: {exc}") from None
    if on_grid and new == idx:
        return policy
    return PruningPolicy(tuple((u, lv[k]) for u, lv, k in zip(units, levels, new, strict=True)))


def min_tolerance(space: SearchSpace, units: Sequence[str], weights: Mapping[str, int]) -> float:
    """Half the largest change of the mean sparsity that one level step of one unit makes.

    With budget.tolerance at least this, the band target +- tolerance is as wide as the largest
    single step, so `project` can always land in it (no step can jump over it).
    """
    total = math.fsum(float(weights[u]) for u in units)
    largest = 0.0
    for u in units:
        lv = space.levels_for(u)
        if len(lv) > 1:
            largest = max(largest, weights[u] * max(b - a for a, b in zip(lv, lv[1:], strict=False)) / total)
    return largest / 2


def check_band(space: SearchSpace, units: Sequence[str], weights: Mapping[str, int]) -> None:
    """ConfigError when "project" is on and the budget band is narrower than one level step."""
    if space.budget.over_budget != "project":
        return
    need = min_tolerance(space, units, weights)
    if space.budget.tolerance < need - _EPS:
        raise ConfigError(
            f"search space {space.name!r}: budget.tolerance {space.budget.tolerance:g} is too tight for "
            f"over_budget: project (one level step moves the mean sparsity by up to {2 * need:.4g}); "
            f"set budget.tolerance >= {math.ceil(round(need * 1e4, 6)) / 1e4:g}"
        )


def fit_to_budget(policy: PruningPolicy, space: SearchSpace, weights: Mapping[str, int]) -> PruningPolicy:
    """The policy a trial scores: projected ("project"), repaired ("repair"), or as sampled (otherwise)."""
    mode = space.budget.over_budget
    if mode == "project":
        return project(policy, space, weights)
    if mode == "repair":
        return repair(policy, space, weights)
    return policy


def policy_indices(policy: PruningPolicy, space: SearchSpace) -> dict[str, int]:
    """`{unit: index of its level}` for a policy on the space's levels (what a trial's params hold)."""
    out: dict[str, int] = {}
    for unit, ratio in policy.ratios:
        levels = space.levels_for(unit)
        k = _nearest_index(levels, ratio)
        if abs(levels[k] - ratio) > 1e-6:
            raise PolicyError(f"unit {unit!r} ratio {ratio:g} is not one of its levels; project the policy first")
        out[unit] = k
    return out
