"""LLaVA-NeXT (`llava_next`, "LLaVA-1.6"): AnyRes, i.e. a base crop plus a grid of crops per image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from efficientllava.families.base import ModelFamily, register_family, vit_tokens
from efficientllava.families.llava import LLAVA_CHECKPOINT_PREFIXES
from efficientllava.families.prompts import CHAT, COMPACT, LLAVA_15


@register_family
class LlavaNextFamily(ModelFamily):
    """LLaVA-NeXT: the number of crops (and image tokens) depends on each image's size (`image_sizes`)."""

    model_type: ClassVar[str] = "llava_next"
    title: ClassVar[str] = "LLaVA-NeXT"
    model_class_name: ClassVar[str] = "LlavaNextForConditionalGeneration"
    processor_class_name: ClassVar[str] = "LlavaNextProcessor"
    forward_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
    checkpoint_prefixes = LLAVA_CHECKPOINT_PREFIXES
    prompt_formats: ClassVar[tuple[str, ...]] = (CHAT, LLAVA_15, COMPACT)

    def vision_sequences(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[int]:
        """One ViT sequence per crop; the crops of each image follow from its size, as the model computes them."""
        # imported here: the modeling module is heavy, and only cost accounting needs it
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config: Any = model.config
        vc = config.vision_config
        crop = vit_tokens(self.vision_tower(model), vc.image_size, vc.image_size, vc.patch_size)
        sequences: list[int] = []
        for size in batch["image_sizes"].tolist():
            crops = image_size_to_num_patches(size, config.image_grid_pinpoints, vc.image_size)
            sequences += [crop] * int(crops)
        return sequences
