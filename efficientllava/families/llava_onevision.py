"""LLaVA-OneVision (`llava_onevision`): SigLIP with AnyRes crops, a Qwen2 decoder."""

from __future__ import annotations

from typing import ClassVar

from efficientllava.families.base import register_family
from efficientllava.families.llava_next import LlavaNextFamily
from efficientllava.families.prompts import CHAT, COMPACT


@register_family
class LlavaOnevisionFamily(LlavaNextFamily):
    """LLaVA-OneVision: LLaVA-NeXT's layout and crops; its processor also carries a video processor."""

    model_type: ClassVar[str] = "llava_onevision"
    title: ClassVar[str] = "LLaVA-OneVision"
    model_class_name: ClassVar[str] = "LlavaOnevisionForConditionalGeneration"
    processor_class_name: ClassVar[str] = "LlavaOnevisionProcessor"
    optional_inputs: ClassVar[tuple[str, ...]] = ("batch_num_images",)
    prompt_formats: ClassVar[tuple[str, ...]] = (CHAT, COMPACT)
    video_processor: ClassVar[bool] = True
