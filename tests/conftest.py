"""Shared fixtures: small random LLaVA models and encoded synthetic batches (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from efficientllava.data.synthetic import make_synthetic
from efficientllava.models.tiny import TinyConfig, build_tiny
from efficientllava.prompting import COMPACT, encode_batches
from efficientllava.pruning.bank import BankSpec, build_bank
from efficientllava.pruning.materialize import Materializer

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


@pytest.fixture
def small_setup(tmp_path):
    """A fresh small tiny LLaVA, its processor, 16 encoded samples and a Materializer over a magnitude bank."""
    model, processor = build_tiny(SMALL)
    model.eval()
    batches = encode_batches(processor, make_synthetic(16, 0, "train"), 8, COMPACT)
    bank = build_bank(model, batches, MAGNITUDE_SPEC, tmp_path / "bank")
    return model, processor, batches, Materializer(model, bank)


@pytest.fixture(scope="session")
def small_model():
    """A random 2-layer tiny LLaVA and its processor (session-wide: do not modify it in place)."""
    return build_tiny(SMALL)


@pytest.fixture(scope="session")
def small_batches(small_model):
    """16 synthetic samples encoded for `small_model`, in batches of 8."""
    _, processor = small_model
    return encode_batches(processor, make_synthetic(16, 0, "train"), 8, COMPACT)
