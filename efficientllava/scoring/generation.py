"""Greedy batched answer generation for the held-out check of open-ended and unlabelled tasks.

Prompts are encoded once, left padded (generation appends after each prompt's last real token),
and reused for the dense model and every policy; `generate_answers` runs `model.generate`
greedily up to a token cap, each answer ending at the first EOS.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import GenerationConfig

from efficientllava.prompting import build_prompt

DEFAULT_MAX_NEW_TOKENS = 16  # a VQA short answer is a word or phrase


@dataclass(frozen=True)
class GeneratedAnswers:
    """Decoded answers of one generation pass, with throughput."""

    answers: tuple[str, ...]
    new_tokens: int  # generated tokens, EOS included, padding excluded
    seconds: float

    @property
    def n(self) -> int:
        """Number of answers."""
        return len(self.answers)

    @property
    def samples_per_s(self) -> float:
        """Throughput of the generation."""
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def dataset_prompts(dataset: datasets.Dataset, fmt: str, image_token: str) -> list[str]:
    """The prompt of each sample (open-ended where it has no options) in format `fmt`."""
    return [build_prompt(q, o, c, fmt, image_token)
            for q, o, c in zip(dataset["question"], dataset["options"], dataset["context"], strict=True)]


def encode_prompt_batches(processor: Any, images: Sequence[Any], prompts: Sequence[str], batch_size: int,
                          device: torch.device | str = "cpu",
                          dtype: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """Left-padded model inputs of `prompts` with their images, in batches, on `device`.

    Each batch holds whatever the processor returns (input_ids, attention_mask, pixel_values and,
    for families that need them, image sizes or grids); floating tensors are cast to `dtype`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batches = []
        for start in range(0, len(prompts), batch_size):
            imgs = [im.convert("RGB") for im in images[start : start + batch_size]]
            enc = processor(images=imgs, text=list(prompts[start : start + batch_size]), return_tensors="pt",
                            padding=True)
            batch = {}
            for key, value in enc.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                batch[key] = value.to(device)
            batches.append(batch)
        return batches
    finally:
        tokenizer.padding_side = side


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config has an EOS token; "
                         "open-ended answers need one to end")
    return ids


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, batches: Sequence[dict[str, torch.Tensor]],
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> GeneratedAnswers:
    """Greedy answers to pre-encoded prompt batches (see encode_prompt_batches): at most `max_new_tokens`, cut at EOS."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos, pad_token_id=pad)
    start = time.perf_counter()
    answers: list[str] = []
    new_tokens = 0
    for batch in batches:
        out = model.generate(**batch, generation_config=config)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            new_tokens += len(row) if stop is None else stop + 1
            answers.append(tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
    return GeneratedAnswers(tuple(answers), new_tokens, time.perf_counter() - start)
