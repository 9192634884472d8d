"""LLaVA-1.5 (`llava`): CLIP ViT-L at a fixed 336 px, a 2-layer MLP projector, a Vicuna (LLaMA) decoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from efficientllava.families.base import (
    ModelFamily,
    TokenCounts,
    has_class_token,
    register_family,
    vit_tokens,
)
from efficientllava.families.prompts import CHAT, COMPACT, LLAVA_15

# transformers 5 names the decoder `model.language_model.layers` but save_pretrained writes
# LLaVA checkpoints in the original `language_model.model.layers` layout (LLaVA-NeXT too).
LLAVA_CHECKPOINT_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


@register_family
class LlavaFamily(ModelFamily):
    """LLaVA-1.5: one 336 px crop per image, so every image costs the same tokens."""

    model_type: ClassVar[str] = "llava"
    title: ClassVar[str] = "LLaVA-1.5"
    model_class_name: ClassVar[str] = "LlavaForConditionalGeneration"
    processor_class_name: ClassVar[str] = "LlavaProcessor"
    checkpoint_prefixes = LLAVA_CHECKPOINT_PREFIXES
    # LLaVA-1.5's own ScienceQA prompt by default (what its reported accuracies use).
    prompt_formats: ClassVar[tuple[str, ...]] = (LLAVA_15, CHAT, COMPACT)
    default_prompt_format: ClassVar[str] = LLAVA_15

    def vision_sequences(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[int]:
        """One ViT sequence per image: pixel_values is [batch, 3, H, W]."""
        pixels = batch["pixel_values"]
        config: Any = model.config
        patch = config.vision_config.patch_size
        return [vit_tokens(self.vision_tower(model), pixels.shape[-2], pixels.shape[-1], patch)] * pixels.shape[0]

    def fixed_token_counts(self, model: nn.Module, tokens: int) -> TokenCounts:
        """CLIP at the config's image size; the LLM gets the patches (and CLS under the `full` strategy)."""
        config: Any = model.config
        vc = config.vision_config
        vision = self.vision_tower(model)
        seq = vit_tokens(vision, vc.image_size, vc.image_size, vc.patch_size)
        patches = (vc.image_size // vc.patch_size) ** 2
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        image = patches + int(has_class_token(vision) and full)
        return TokenCounts(float(tokens), float(image), float(seq), float(seq * seq))
