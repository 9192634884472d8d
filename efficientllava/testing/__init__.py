"""Test helpers shipped with the package: contract suites every plug-in passes (like optuna.testing)."""
