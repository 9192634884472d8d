"""Materialise a policy by swapping bank tensors into the model in place; restore the dense weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from efficientllava.errors import PolicyError
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.bank import VariantBank


class Materializer:
    """Applies policies from a VariantBank to `model`; only units whose level changes are copied."""

    def __init__(self, model: nn.Module, bank: VariantBank, dense_device: torch.device | str | None = None):
        self.model = model
        self.bank = bank
        self.weights: dict[str, torch.Tensor] = {
            name: model.get_submodule(name).weight for names in bank.unit_linears.values() for name in names}
        device = next(iter(self.weights.values())).device
        # The dense copy lives beside the model unless told otherwise (e.g. CPU for a 7B model on a GPU).
        self.dense = {n: w.detach().to(dense_device or device, copy=True) for n, w in self.weights.items()}
        self.current: dict[str, float] = {unit: 0.0 for unit in bank.unit_linears}

    def apply(self, policy: PruningPolicy) -> None:
        """Make the model's weights those of `policy` (a memory copy per changed unit)."""
        ratios = policy.as_dict()
        unknown = set(ratios) - set(self.current)
        if unknown:
            raise PolicyError(f"policy names unit(s) {', '.join(sorted(unknown))} that the variant bank does not hold")
        for unit, level in ratios.items():
            self.bank.check(unit, level)
        device = next(iter(self.weights.values())).device
        with torch.no_grad():
            for unit, level in ratios.items():
                if self.current[unit] == level:
                    continue
                names = self.bank.unit_linears[unit]
                if level == 0.0:
                    for name in names:
                        self.weights[name].copy_(self.dense[name], non_blocking=True)
                else:
                    for name, tensor in self.bank.tensors(unit, level, device).items():
                        self.weights[name].copy_(tensor, non_blocking=True)
                self.current[unit] = level
        for unit in set(self.current) - set(ratios):  # units the policy leaves out stay dense
            if self.current[unit] != 0.0:
                self._restore_unit(unit)

    def _restore_unit(self, unit: str) -> None:
        with torch.no_grad():
            for name in self.bank.unit_linears[unit]:
                self.weights[name].copy_(self.dense[name])
        self.current[unit] = 0.0

    def restore(self) -> None:
        """Put every dense weight back (bit-exact)."""
        for unit in self.current:
            if self.current[unit] != 0.0:
                self._restore_unit(unit)

    @contextlib.contextmanager
    def applied(self, policy: PruningPolicy) -> Iterator[nn.Module]:
        """Context in which the model carries `policy`; dense weights are restored on exit."""
        try:
            self.apply(policy)
            yield self.model
        finally:
            self.restore()
