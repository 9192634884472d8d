"""The search engine: a problem-agnostic seam (`api`), samplers, Optuna studies, workers, Tune, the driver."""
