"""Qwen2-VL (`qwen2_vl`) and Qwen2.5-VL (`qwen2_5_vl`): a native-resolution ViT whose patch merger is the projector."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from efficientllava.families.base import ModelFamily, register_family
from efficientllava.families.prompts import CHAT, COMPACT


@register_family
class Qwen2VLFamily(ModelFamily):
    """Qwen2-VL: each image is cut into patches at (close to) its own resolution; `image_grid_thw` gives the grid.

    The vision tower `model.visual` ends in `merger`, an MLP that merges 2x2 patches into one LLM
    token: that merger is the projector here. pixel_values is [all patches of the batch, C*T*P*P],
    not per sample.
    """

    model_type: ClassVar[str] = "qwen2_vl"
    title: ClassVar[str] = "Qwen2-VL"
    model_class_name: ClassVar[str] = "Qwen2VLForConditionalGeneration"
    processor_class_name: ClassVar[str] = "Qwen2VLProcessor"
    forward_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    optional_inputs: ClassVar[tuple[str, ...]] = ("mm_token_type_ids",)  # multimodal RoPE positions
    projector_path: ClassVar[str] = "model.visual.merger"
    vision_path: ClassVar[str] = "model.visual"
    checkpoint_prefixes = (("model.language_model.", "model."), ("model.visual.", "visual."))
    prompt_formats: ClassVar[tuple[str, ...]] = (CHAT, COMPACT)
    video_processor: ClassVar[bool] = True

    def vision_sequences(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[int]:
        """One sequence of t*h*w patches per image (full attention over the image's patches)."""
        return [int(t * h * w) for t, h, w in batch["image_grid_thw"].tolist()]

    def vision_dims(self, config: Any) -> tuple[int, int]:
        """(blocks, embedding width) of the vision transformer."""
        vc = config.vision_config
        return int(vc.depth), int(vc.embed_dim)


@register_family
class Qwen25VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: Qwen2-VL's layout; the vision blocks use windowed attention (counted here as full)."""

    model_type: ClassVar[str] = "qwen2_5_vl"
    title: ClassVar[str] = "Qwen2.5-VL"
    model_class_name: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    processor_class_name: ClassVar[str] = "Qwen2_5_VLProcessor"

    def vision_dims(self, config: Any) -> tuple[int, int]:
        """(blocks, hidden width) of the vision transformer."""
        vc = config.vision_config
        return int(vc.depth), int(vc.hidden_size)
