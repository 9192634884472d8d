"""Distributed policy search: Ray Tune trials, an Optuna study per round, a driver actor."""
