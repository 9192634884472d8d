"""Cost of a pruned model: parameters kept, FLOPs per sample, measured latency, 2:4 kernel support.

FLOPs are an analytic estimate for one forward pass of one sample of `tokens_per_sample` tokens
(image tokens included), counting a multiply-add as 2 FLOPs:

- LLM linears: 2 * kept weights * T (a pruned weight is assumed to cost nothing; real speed-ups
  need sparse kernels, which is why `measure_latency` exists);
- lm_head: 2 * its weights * T (transformers computes logits at every position by default);
- attention scores and values: 4 * T^2 * (heads * head_dim) per decoder layer (causal masking's
  halving is ignored, as kernels compute the full square);
- projector: 2 * its weights * image tokens; vision tower: 2 * its Linear/Conv weights (the
  projector's excluded where it sits inside the tower, as Qwen2-VL's merger does) * its tokens
  + 4 * sum over its attention sequences of length^2 * hidden per encoder layer (every layer
  counted, although LLaVA reads the penultimate one).

Image and vision token counts come from the model family: counted from encoded batches
(`CostModel.from_batches`; dynamic-resolution models such as LLaVA-NeXT or Qwen2-VL need that),
or, for fixed-resolution LLaVA-1.5, from the config (`CostModel.from_model`).
Ignored: norms, activations, rotary embeddings, biases and embedding lookups (no matmul).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from efficientllava.errors import ConfigError
from efficientllava.families import TokenCounts, family_of, model_inputs
from efficientllava.policy import PruningPolicy
from efficientllava.pruning.units import linear_modules, num_decoder_layers, prunable_units

SEMI_STRUCTURED_CPU_MESSAGE = (
    "2:4 semi-structured kernels need an NVIDIA GPU with compute capability >= 8.0; not measurable here"
)


@dataclass(frozen=True)
class Cost:
    """Cost of one policy. `llm_params*` count the LLM's prunable linear weights only."""

    kept_fraction: float  # llm_params_kept / llm_params
    llm_params: int
    llm_params_kept: int
    total_params: int  # every (unique) parameter of the model
    total_params_kept: int
    flops_per_sample: float
    dense_flops_per_sample: float
    flops_speedup: float  # dense / pruned FLOPs: a theoretical ceiling, not a measured speed-up


def _matmul_weights(module: nn.Module | None, exclude: nn.Module | None = None) -> int:
    """Weights of the Linear and Conv layers of `module` (what its matmuls multiply by), less those of `exclude`."""
    if module is None:
        return 0
    skip = {id(m) for m in exclude.modules()} if exclude is not None else set()
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, kinds) and id(m) not in skip)


@dataclass(frozen=True)
class CostModel:
    """Parameter and token counts of a model, from which any policy's cost is computed without the model."""

    unit_linears: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]  # unit -> ((linear, numel), ...)
    tokens_per_sample: int
    total_params: int
    lm_head_params: int
    projector_params: int
    vision_params: int  # Linear/Conv weights of the vision tower (projector excluded)
    vision_tokens: float  # tokens inside the vision tower per sample (all crops, CLS included)
    image_tokens: float  # tokens the projector maps into the LLM per sample
    vision_layers: int
    vision_hidden: int
    llm_layers: int
    attn_width: int  # heads * head_dim of the LLM
    vision_attention: float = 0.0  # per sample, sum over the tower's attention sequences of length^2

    def __post_init__(self) -> None:
        """Validate the token count."""
        if (
            isinstance(self.tokens_per_sample, bool)
            or not isinstance(self.tokens_per_sample, int)
            or (self.tokens_per_sample < 1)
        ):
            raise ConfigError(f"tokens_per_sample {self.tokens_per_sample!r} must be an integer >= 1")

    @classmethod
    def from_model(cls, model: nn.Module, granularity: str, tokens_per_sample: int,
                   counts: TokenCounts | None = None) -> CostModel:
        """Read the counts from a model; image/vision tokens from `counts`, else the family's fixed resolution."""
        family = family_of(model)
        if counts is None:
            counts = family.fixed_token_counts(model, tokens_per_sample)
            if counts is None:
                raise ConfigError(f"{family.title} sizes images dynamically: count its tokens from encoded "
                                  "batches (CostModel.from_batches)")
        units = prunable_units(model, granularity)
        unit_linears = tuple(
            (u.name, tuple((name, mod.weight.numel()) for name, mod in linear_modules(model, u).items()))
            for u in units
        )
        config: Any = model.config
        projector = family.projector(model)
        vision_layers, vision_hidden = family.vision_dims(config)
        tc = getattr(config, "text_config", config)
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        return cls(
            unit_linears=unit_linears,
            tokens_per_sample=tokens_per_sample,
            total_params=sum(p.numel() for p in model.parameters()),  # parameters() de-duplicates ties
            lm_head_params=_matmul_weights(family.lm_head(model)),
            projector_params=_matmul_weights(projector),
            vision_params=_matmul_weights(family.vision_tower(model), exclude=projector),
            vision_tokens=counts.vision_tokens,
            image_tokens=counts.image_tokens,
            vision_layers=vision_layers,
            vision_hidden=vision_hidden,
            llm_layers=num_decoder_layers(model),
            attn_width=heads * head_dim,
            vision_attention=counts.vision_attention,
        )

    @classmethod
    def from_batches(cls, model: nn.Module, granularity: str,
                     batches: Iterable[Mapping[str, torch.Tensor]]) -> CostModel:
        """The cost model for samples like those of `batches` (mean tokens per sample, counted from them)."""
        counts = family_of(model).token_counts(model, batches)
        return cls.from_model(model, granularity, max(1, round(counts.tokens)), counts)

    @property
    def unit_names(self) -> list[str]:
        """Unit names in model order."""
        return [unit for unit, _ in self.unit_linears]

    def unit_param_counts(self) -> dict[str, int]:
        """Prunable weights per unit, in model order: the weights of the sparsity budget."""
        return {unit: sum(n for _, n in linears) for unit, linears in self.unit_linears}

    def unit_flops(self) -> dict[str, float]:
        """Dense FLOPs per sample of each unit's linears (2 * weights * tokens); a ratio r removes r of them."""
        return {unit: 2.0 * n * self.tokens_per_sample for unit, n in self.unit_param_counts().items()}

    @property
    def llm_params(self) -> int:
        """Prunable linear weights of the LLM."""
        return sum(self.unit_param_counts().values())

    def _fixed_flops(self) -> float:
        """FLOPs that no policy changes: lm_head, attention, projector, vision tower."""
        t = self.tokens_per_sample
        return float(
            2 * self.lm_head_params * t
            + 4 * t * t * self.attn_width * self.llm_layers
            + 2 * self.projector_params * self.image_tokens
            + 2 * self.vision_params * self.vision_tokens
            + 4 * self.vision_attention * self.vision_hidden * self.vision_layers
        )

    def cost(self, policy: PruningPolicy) -> Cost:
        """Cost of `policy` (which must cover exactly this model's units)."""
        policy.validate(self.unit_names)
        counts = self.unit_param_counts()
        kept = sum(counts[u] * (1.0 - r) for u, r in policy.ratios)
        llm = self.llm_params
        fixed = self._fixed_flops()
        dense = fixed + 2.0 * llm * self.tokens_per_sample
        flops = fixed + 2.0 * kept * self.tokens_per_sample
        kept_int = round(kept)
        return Cost(
            kept_fraction=kept / llm if llm else 1.0,
            llm_params=llm,
            llm_params_kept=kept_int,
            total_params=self.total_params,
            total_params_kept=self.total_params - (llm - kept_int),
            flops_per_sample=flops,
            dense_flops_per_sample=dense,
            flops_speedup=dense / flops if flops > 0 else float("inf"),
        )


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def measure_latency(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], repeats: int = 3, warmup: int = 1
) -> float:
    """Median wall-clock seconds per sample of forward passes over `batches` (synchronised on CUDA)."""
    batches = list(batches)
    if not batches:
        raise ConfigError("measure_latency needs at least one batch")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"measure_latency needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = _device_of(model)
    n_samples = sum(int(b["input_ids"].shape[0]) for b in batches)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def one_pass() -> float:
        sync()
        start = time.perf_counter()
        for batch in batches:
            model(**model_inputs(batch))
        sync()  # CUDA launches are asynchronous: time the work, not the launches
        return time.perf_counter() - start

    with torch.inference_mode():
        for _ in range(warmup):
            one_pass()
        times = [one_pass() for _ in range(repeats)]
    return statistics.median(times) / n_samples


def semi_structured_support(device: torch.device | str) -> tuple[bool, str]:
    """Whether `torch.sparse.to_sparse_semi_structured` (2:4 kernels) can run on `device`, and why."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, SEMI_STRUCTURED_CPU_MESSAGE
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < (8, 0):
        return False, f"{name} has compute capability {major}.{minor}; 2:4 kernels need >= 8.0"
    try:  # a real conversion and matmul: the build may lack cuSPARSELt/CUTLASS kernels
        dense = torch.tensor([0, 0, 1, 1], dtype=torch.float16, device=device).tile((128, 32))
        sparse = torch.sparse.to_sparse_semi_structured(dense)
        torch.mm(sparse, torch.ones(128, 128, dtype=torch.float16, device=device))
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here", with its reason
        return (
            False,
            f"2:4 kernels fail on {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        )
    return True, f"{name} (compute capability {major}.{minor}) runs 2:4 semi-structured kernels"
