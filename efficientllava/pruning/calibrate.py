"""Calibration statistics of linear layers' inputs: Hessian 2/n X^T X (SparseGPT) and column norms (Wanda)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from efficientllava.errors import ConfigError, DataError
from efficientllava.families import model_inputs


class _StopForward(Exception):
    """Raised once every hooked linear has run: later layers are not needed for these statistics."""


@dataclass(frozen=True, eq=False)
class LayerStats:
    """Input statistics of one linear layer; linears fed the same tensor share one LayerStats object."""

    hessian: Tensor | None  # [in, in] fp32, (2 / n_tokens) * X^T X; None if not collected
    col_sq_norm: Tensor  # [in] fp32, sum over tokens of x_j^2 (Wanda uses its sqrt)
    n_tokens: int


class _Accumulator:
    """Running sums over the (unpadded) token rows of one input tensor stream."""

    def __init__(self, in_features: int, need_hessian: bool, device: torch.device) -> None:
        self.xtx = torch.zeros(in_features, in_features, device=device) if need_hessian else None
        self.sq = torch.zeros(in_features, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.to(self.sq.device, torch.float32)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        self.sq += (x * x).sum(0)
        self.n += x.shape[0]

    def stats(self) -> LayerStats:
        hessian = self.xtx.mul_(2.0 / self.n) if self.xtx is not None else None
        return LayerStats(hessian, self.sq, self.n)


def _token_rows(x: Tensor, mask: Tensor | None, name: str) -> Tensor:
    """Rows of `x` [..., in] at tokens where the attention mask is 1 (all rows if there is no mask)."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if x.shape[:-1] != mask.shape:
        raise DataError(
            f"calibration: input of {name} has token shape {tuple(x.shape[:-1])} but attention_mask has "
            f"{tuple(mask.shape)}: calibrate only language-model linears"
        )
    return x[mask.to(x.device) == 1]


def collect_stats(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    linear_names: Iterable[str],
    *,
    need_hessian: bool,
    device: torch.device | str | None = None,
) -> dict[str, LayerStats]:
    """Run `batches` through `model` and return input statistics of each named nn.Linear.

    Linears that receive the very same input tensor in a forward (q/k/v, gate/up) share one
    accumulator, hence one Hessian: pass one decoder layer's linears at a time to bound memory.
    Each forward stops as soon as all named linears have run (each is assumed to run once per forward).
    """
    modules = dict(model.named_modules())
    names = list(linear_names)
    for name in names:
        if not isinstance(modules.get(name), nn.Linear):
            raise ConfigError(f"calibration: {name!r} is not an nn.Linear of {type(model).__name__}")
    accs: dict[str, _Accumulator] = {}
    live: list[tuple[Tensor, _Accumulator]] = []  # inputs seen in this forward (refs keep ids unique)
    state: dict[str, Tensor | None] = {"mask": None}
    done: set[str] = set()

    def make_hook(name: str, linear: nn.Linear):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["input"]
            shared = next((acc for t, acc in live if t is x), None)
            if shared is not None:  # same tensor already counted by a sibling linear
                if accs.setdefault(name, shared) is not shared:
                    raise RuntimeError(f"calibration: {name} changed its input-sharing group between batches")
                return
            if name not in accs:
                dev = torch.device(device) if device is not None else linear.weight.device
                accs[name] = _Accumulator(linear.in_features, need_hessian, dev)
            accs[name].add(_token_rows(x.detach(), state["mask"], name))
            live.append((x, accs[name]))

        return hook

    def make_done_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            done.add(name)
            if len(done) == len(set(names)):
                raise _StopForward

        return hook

    handles = []
    for name in names:
        handles.append(
            modules[name].register_forward_pre_hook(make_hook(name, modules[name]), with_kwargs=True)
        )
        handles.append(modules[name].register_forward_hook(make_done_hook(name)))
    try:
        with torch.no_grad():
            for batch in batches:
                state["mask"] = batch.get("attention_mask")
                try:
                    model(**model_inputs(batch))
                except _StopForward:
                    pass
                live.clear()
                done.clear()
    finally:
        for handle in handles:
            handle.remove()
        live.clear()
    missing = [name for name in names if name not in accs or accs[name].n == 0]
    if missing:
        raise DataError(f"calibration saw no (unpadded) tokens for {', '.join(missing)}: check the batches")
    groups = {id(acc): acc for acc in accs.values()}
    stats = {key: acc.stats() for key, acc in groups.items()}  # once per group: stats() scales in place
    return {name: stats[id(accs[name])] for name in names}
