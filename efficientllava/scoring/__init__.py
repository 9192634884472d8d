"""Scoring of pruning policies: fidelity signals, the SRM penalty, cost, and the objective."""

# The fidelity signals `objective.fidelity` may name (see scoring.fidelity); kept here, torch-free,
# so that config validation does not import torch.
FIDELITIES = ("accuracy", "loglik", "kl")
