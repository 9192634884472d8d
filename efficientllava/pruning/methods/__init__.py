"""Pruning methods as plug-ins: one file per method, registered by name (see `base`)."""

from efficientllava.pruning.methods import magnitude, obs_mask, sparsegpt, wanda  # noqa: F401 (register them)
from efficientllava.pruning.methods.base import (
    STATS,
    Calibration,
    MethodOptions,
    NestedMethod,
    PruningMethod,
    get_method,
    method_class,
    method_names,
    prune_prepared,
    prune_weight,
    register_method,
)

__all__ = [
    "STATS",
    "Calibration",
    "MethodOptions",
    "NestedMethod",
    "PruningMethod",
    "get_method",
    "method_class",
    "method_names",
    "prune_prepared",
    "prune_weight",
    "register_method",
]
