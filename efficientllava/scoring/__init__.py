"""Scoring of pruning policies: fidelity signals, the SRM penalty, cost, and the objective."""

# The fidelity signals `objective.fidelity` may name (see scoring.fidelity); kept here, torch-free,
# so that config validation does not import torch.
FIDELITIES = ("accuracy", "loglik", "kl")
# The task's own figure of a model on held-out data, by metric name (Pipeline.measure), as reports label it.
METRIC_LABELS = {"accuracy": "accuracy", "exact_match": "exact match", "vqa_accuracy": "VQA accuracy",
                 "agreement": "agreement with dense"}
