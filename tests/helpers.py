"""Helpers shared by tests (imported as `helpers`; conftest.py holds only fixtures): small random LLaVA
models and the magnitude bank spec the fixtures use."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from efficientllava.models.tiny import TinyConfig
from efficientllava.pruning.bank import BankSpec

# One intra-op thread: tiny matmuls on a busy 2-core machine are far slower with two (spin-waits).
torch.set_num_threads(1)

SMALL = TinyConfig(text_layers=2, text_hidden=64, text_intermediate=128, vision_layers=1)
MAGNITUDE_SPEC = BankSpec(
    "layer", (("layer.0", (0.0, 0.5)), ("layer.1", (0.0, 0.5))), "magnitude", "unstructured"
)


def random_llava() -> LlavaForConditionalGeneration:
    """A random 2-layer LLaVA (16 px images, 4 image tokens of id 3) built from config, in eval mode."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=3, vision_feature_select_strategy="default"
    )
    return LlavaForConditionalGeneration(config).eval()
