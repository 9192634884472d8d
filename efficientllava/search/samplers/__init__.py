"""Optuna samplers, one file per sampler (the registry itself comes with the engine's sampler seam)."""
