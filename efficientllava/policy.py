"""Pruning policies: one sparsity ratio per prunable unit of the language model, in model order."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from efficientllava.errors import PolicyError

POLICY_PREFIX = "policy/"  # a trial record's result term per unit (search.api.POLICY_PREFIX)
_REPR_HEAD = 4  # units shown at the start of a long repr
_REPR_TAIL = 2  # and at its end


def _brief(names: Iterable[str], limit: int = 6) -> str:
    """A short comma list of names, with a count when it is cut."""
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[: limit - 1])}, ..., {names[-1]} ({len(names)} in all)"


@dataclass(frozen=True)
class PruningPolicy:
    """Sparsity ratio per prunable unit (e.g. `layer.3` or `layer.3.mlp`), kept in model order."""

    ratios: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        """Check the pairs' types, duplicates and that every ratio lies in [0, 1)."""
        seen: set[str] = set()
        clean: list[tuple[str, float]] = []
        for pair in self.ratios:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise PolicyError(f"policy entry {pair!r} is not a (unit name, ratio) pair")
            unit, ratio = pair
            if unit in seen:
                raise PolicyError(f"policy gives unit {unit!r} more than one ratio; give each unit one")
            seen.add(unit)
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise PolicyError(f"policy ratio of unit {unit!r} is {ratio!r}, not a number in [0, 1)")
            if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
                raise PolicyError(
                    f"policy ratio of unit {unit!r} is {ratio!r}, outside [0, 1); "
                    "a ratio is the fraction of weights pruned"
                )
            clean.append((unit, float(ratio) + 0.0))  # + 0.0 turns -0.0 into 0.0
        object.__setattr__(self, "ratios", tuple(clean))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, ratios: Mapping[str, float]) -> PruningPolicy:
        """A policy from a `{unit: ratio}` mapping; the mapping's order is kept."""
        if not isinstance(ratios, Mapping):
            raise PolicyError(f"a policy is a mapping of unit name to ratio, got {type(ratios).__name__}")
        return cls(tuple((unit, ratio) for unit, ratio in ratios.items()))

    @classmethod
    def uniform(cls, unit_names: Iterable[str], ratio: float) -> PruningPolicy:
        """The same ratio for every unit."""
        return cls(tuple((unit, ratio) for unit in unit_names))

    # -- access -------------------------------------------------------------------------------
    @property
    def units(self) -> tuple[str, ...]:
        """Unit names, in model order."""
        return tuple(unit for unit, _ in self.ratios)

    def ratio(self, unit: str) -> float:
        """The sparsity ratio of `unit`."""
        for name, value in self.ratios:
            if name == unit:
                return value
        raise PolicyError(f"policy has no unit {unit!r}; its units are {_brief(self.units)}")

    def as_dict(self) -> dict[str, float]:
        """`{unit: ratio}` in model order."""
        return dict(self.ratios)

    def __len__(self) -> int:
        """Number of units."""
        return len(self.ratios)

    @property
    def key(self) -> str:
        """Stable short hash of the ratios (rounded to 6 d.p.), for de-duplicating trials."""
        # Sorted keys and fixed-precision strings: equal policies hash equally whatever their
        # order or float noise (0.30000000000000004 vs 0.3), across processes and versions.
        canonical = json.dumps({u: f"{r:.6f}" for u, r in self.ratios}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def mean_sparsity(self, weights: Mapping[str, int]) -> float:
        """Parameter-weighted mean sparsity; `weights` gives each unit's parameter count."""
        missing = [u for u in self.units if u not in weights]
        if missing:
            raise PolicyError(
                f"no parameter count for units {_brief(missing)}; weights must cover every unit"
            )
        total = sum(weights[u] for u in self.units)
        if total <= 0:
            raise PolicyError("the policy's units have no parameters; cannot weight their sparsity")
        return sum(weights[u] * r for u, r in self.ratios) / total

    def validate(self, unit_names: Iterable[str]) -> PruningPolicy:
        """Check the policy covers exactly `unit_names`; returns itself. Ratios are checked at construction."""
        expected = list(unit_names)
        known = set(expected)
        unknown = [u for u in self.units if u not in known]
        if unknown:
            raise PolicyError(
                f"policy names unit {unknown[0]!r}, which the model does not have"
                f"{f' ({len(unknown)} unknown units)' if len(unknown) > 1 else ''}; "
                f"valid units: {_brief(expected)}"
            )
        have = set(self.units)
        missing = [u for u in expected if u not in have]
        if missing:
            raise PolicyError(f"policy has no ratio for units {_brief(missing)}; give every unit a ratio")
        return self

    # -- text ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        """`PruningPolicy(12 units, mean=0.50: layer.0=0.30 layer.1=0.55 ... layer.11=0.40)`."""
        if not self.ratios:
            return "PruningPolicy(0 units)"
        mean = sum(r for _, r in self.ratios) / len(self.ratios)
        items = [f"{u}={r:.2f}" for u, r in self.ratios]
        if len(items) > _REPR_HEAD + _REPR_TAIL + 1:
            items = items[:_REPR_HEAD] + ["..."] + items[-_REPR_TAIL:]
        noun = "unit" if len(self.ratios) == 1 else "units"
        return f"PruningPolicy({len(self.ratios)} {noun}, mean={mean:.2f}: {' '.join(items)})"

    def to_json(self) -> str:
        """JSON text: `{"ratios": {unit: ratio, ...}, "key": ...}` in model order."""
        return json.dumps({"ratios": self.as_dict(), "key": self.key}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PruningPolicy:
        """Parse `to_json` output (an export's policy.json), a search's best_policy.json (`policy`), a trial
        record (its `policy/<unit>` result terms), or a bare `{unit: ratio}` object."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy is not valid JSON: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("ratios"), dict):
            data = data["ratios"]
        elif isinstance(data, dict) and isinstance(data.get("policy"), dict):
            data = data["policy"]
        elif isinstance(data, dict) and isinstance(data.get("result"), dict) and "params" in data:
            data = {k.removeprefix(POLICY_PREFIX): v for k, v in data["result"].items() if k.startswith(POLICY_PREFIX)}
        if not isinstance(data, dict):
            raise PolicyError('policy JSON must be an object {"ratios": {unit: ratio, ...}}')
        if not data:
            raise PolicyError("policy has no units; expected {unit: ratio, ...}, an export's policy.json, a "
                              "search's best_policy.json or a trial record")
        return cls.from_mapping(data)

    def save(self, path: str | Path) -> Path:
        """Write the policy as JSON to `path` (parents created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> PruningPolicy:
        """Read a policy JSON file; errors name the file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
        try:
            return cls.from_json(text)
        except PolicyError as exc:
            raise PolicyError(f"policy file {path}: {exc}") from None
