"""Sparsity patterns: unstructured, or N:M (n zeros in every m consecutive input weights of a row)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from efficientllava.errors import ConfigError, PolicyError

PATTERNS = ("unstructured", "2:4", "4:8")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern; `Pattern()` is unstructured, `Pattern(2, 4)` prunes 2 of every 4 weights."""

    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if not (self.n == self.m == 0 or 0 < self.n < self.m):
            raise ConfigError(f"pattern {self.n}:{self.m} is invalid: need 0 < n < m (or 0:0 = unstructured)")

    @classmethod
    def parse(cls, spec: str | Pattern) -> Pattern:
        """Pattern from its string ("unstructured", "2:4", "4:8"); a Pattern passes through."""
        if isinstance(spec, Pattern):
            return spec
        if spec not in PATTERNS:
            raise ConfigError(f"sparsity pattern {spec!r} is unknown: use one of {', '.join(PATTERNS)}")
        if spec == "unstructured":
            return cls()
        n, m = spec.split(":")
        return cls(int(n), int(m))

    @property
    def is_nm(self) -> bool:
        """True for an N:M pattern."""
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def check_sparsity(sparsity: float, pattern: Pattern) -> float:
    """Validate a sparsity ratio for `pattern` and return it as a float (N:M allows only 0 or n/m)."""
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise PolicyError(f"sparsity {sparsity} is out of range: use a ratio in [0, 1)")
    if pattern.is_nm and sparsity != 0.0 and not math.isclose(sparsity, pattern.n / pattern.m, abs_tol=1e-9):
        raise PolicyError(
            f"sparsity {sparsity} does not fit pattern {pattern}: an N:M pattern allows only 0 (dense) "
            f"or n/m = {pattern.n / pattern.m}"
        )
    return sparsity


def check_nm_fits(pattern: Pattern, in_features: int) -> None:
    """Raise PolicyError if an N:M pattern's m does not divide `in_features`."""
    if pattern.is_nm and in_features % pattern.m:
        raise PolicyError(
            f"N:M pattern {pattern} needs in_features divisible by {pattern.m}, got {in_features}: use unstructured"
        )
