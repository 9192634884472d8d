"""Materialise a policy by writing bank variants into the model in place; restore the dense weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from efficientllava.errors import PolicyError
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.bank import VariantBank


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    weight = model.get_submodule(name).weight
    if not isinstance(weight, torch.Tensor):
        raise PolicyError(f"{name!r} of {type(model).__name__} has no weight tensor to prune")
    return weight


class _OnDevice(Mapping[str, torch.Tensor]):
    """Dense weights moved to the model's device on access (only a lazy build reads them)."""

    def __init__(self, dense: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], names: tuple[str, ...]):
        self._dense, self._weights, self._names = dense, weights, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._dense[name].to(self._weights[name].device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Materializer:
    """Applies policies from a VariantBank (any format) to `model`; only units whose level changes are written."""

    def __init__(self, model: nn.Module, bank: VariantBank, dense_device: torch.device | str | None = None):
        self.model = model
        self.bank = bank
        self.weights: dict[str, torch.Tensor] = {
            name: _weight(model, name) for names in bank.unit_linears.values() for name in names}
        device = next(iter(self.weights.values())).device
        # The dense copy lives beside the model unless told otherwise (e.g. CPU for a 7B model on a GPU).
        self.dense = {n: w.detach().to(dense_device or device, copy=True) for n, w in self.weights.items()}
        self.current: dict[str, float] = {unit: 0.0 for unit in bank.unit_linears}

    def _check(self, policy: PruningPolicy) -> dict[str, float]:
        ratios = policy.as_dict()
        unknown = set(ratios) - set(self.current)
        if unknown:
            raise PolicyError(f"policy names unit(s) {', '.join(sorted(unknown))} that the variant bank does not hold")
        for unit, level in ratios.items():
            self.bank.check(unit, level)
        return ratios

    def _dense_of(self, unit: str) -> Mapping[str, torch.Tensor]:
        """The unit's dense weights on the model's device (where lazy variants are built)."""
        return _OnDevice(self.dense, self.weights, self.bank.unit_linears[unit])

    def prepare(self, policy: PruningPolicy) -> None:
        """Make sure the bank holds every variant `policy` needs (a lazy bank builds them; norms become known)."""
        for unit, level in self._check(policy).items():
            if level != 0.0:
                self.bank.ensure(unit, level, self._dense_of(unit))

    def apply(self, policy: PruningPolicy) -> None:
        """Make the model's weights those of `policy` (written per changed unit only)."""
        ratios = self._check(policy)
        with torch.no_grad():
            for unit, level in ratios.items():
                if self.current[unit] == level:
                    continue
                if level == 0.0:
                    self._restore_unit(unit)
                    continue
                names = self.bank.unit_linears[unit]
                dense = {n: self.dense[n] for n in names}
                self.bank.ensure(unit, level, self._dense_of(unit))
                self.bank.write(unit, level, {n: self.weights[n].data for n in names}, dense)
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
