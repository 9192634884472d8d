"""Load a checkpoint of any supported model family (hub id, local path, or the built-in `tiny`) through `from_pretrained`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from efficientllava.errors import ModelLoadError
from efficientllava.families import ModelFamily, family_for, family_names
from efficientllava.families.prompts import CHAT

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its processor, device, dtype, prompt format and model family."""

    model: nn.Module
    processor: Any
    spec: str
    path: str
    device: torch.device
    dtype: torch.dtype
    prompt_format: str
    family: ModelFamily

    @property
    def num_parameters(self) -> int:
        """Number of parameters (zeros included)."""
        return sum(p.numel() for p in self.model.parameters())


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> the first CUDA device when present, else CPU; CUDA requested without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:  # e.g. "gpu": torch's own message is a multi-line type list
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but torch sees no CUDA GPU here; use device: cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} requested but torch sees {torch.cuda.device_count()} CUDA GPU(s); "
                             "use cuda:0 .. or auto")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU; else fp32/fp16/bf16."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[dtype]


def resolve_spec(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` takes: a local directory or a hub id."""
    if spec == "tiny":
        from efficientllava.models.tiny import ensure_tiny

        return str(ensure_tiny())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec}: not a checkpoint directory (no config.json); "
                                 "point at a directory written by save_pretrained")
        _family(spec, _read_json(path / "config.json").get("model_type"))
        return str(path)
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ModelLoadError(f"unknown model spec {spec!r}: use 'tiny', a hub id such as llava-hf/llava-1.5-7b-hf, "
                             "or an existing local checkpoint directory")
    return spec


def _family(spec: str, model_type: Any) -> ModelFamily:
    """The model family of checkpoint `spec`; a one-line error listing the supported ones otherwise."""
    try:
        return family_for(model_type)
    except ModelLoadError:
        raise ModelLoadError(f"{spec}: config.json has model_type {model_type!r}, not a LLaVA checkpoint of a "
                             f"supported family (model_type {', '.join(family_names())})") from None


def _read_json(path: Path) -> dict:
    """A JSON object from a checkpoint file; a corrupt one is a ModelLoadError naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: cannot read it as JSON ({err}); re-save the checkpoint") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}; re-save the checkpoint")
    return data


def _hub_error(spec: str, source: str, err: Exception) -> ModelLoadError:
    """The error for a failed `from_pretrained` of `source` (resolved from `spec`)."""
    if Path(source).is_dir():  # a local checkpoint: advice about the hub would mislead
        reason = str(err).strip().splitlines()[0].strip(" :") if str(err).strip() else type(err).__name__
        return ModelLoadError(f"{spec}: incomplete checkpoint directory ({reason}); re-save it with "
                              "model.save_pretrained and processor.save_pretrained")
    return ModelLoadError(
        f"cannot load {spec!r} from the Hugging Face hub ({type(err).__name__}); if this machine is offline, "
        f"pre-download it elsewhere with `hf download {spec} --local-dir DIR` and pass DIR as the model, "
        "or set HF_HOME to a cache that holds it")


def load_model(spec: str, *, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load a model + processor through its family: `tiny`, a hub id or a local path; eval mode, on `device`."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = resolve_spec(spec)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _hub_error(spec, source, err) from err
    family = _family(spec, config.model_type)
    hf_logging.disable_progress_bar()  # one bar per load in every trial actor is noise, not progress
    try:
        model: nn.Module = family.model_class().from_pretrained(source, dtype=torch_dtype)
        processor = family.load_processor(source)
    except (OSError, ValueError) as err:  # ValueError: e.g. a tokenizer without its tokenizer.json
        raise _hub_error(spec, source, err) from err
    model.to(dev).eval()
    meta = Path(source) / "efficientllava.json"
    fmt = _read_json(meta).get("prompt_format") if meta.is_file() else None
    if fmt is None:
        fmt = family.default_prompt_format
    if fmt not in family.prompt_formats:
        raise ModelLoadError(f"{meta}: unknown prompt_format {fmt!r} for {family.title}; use one of "
                             f"{', '.join(family.prompt_formats)}")
    if fmt == CHAT and getattr(processor, "chat_template", None) is None:
        others = ", ".join(f for f in family.prompt_formats if f != CHAT)
        raise ModelLoadError(f"{spec}: the processor has no chat template, which prompt_format {CHAT!r} needs; "
                             f"add one to the checkpoint or set prompt_format ({others}) in {meta.name}")
    return LoadedModel(model, processor, spec, source, dev, torch_dtype, fmt, family)
