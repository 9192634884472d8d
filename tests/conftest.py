"""Shared fixtures: small random LLaVA models and encoded synthetic batches (no downloads)."""

from __future__ import annotations

import pytest
import torch

from efficientllava.data.synthetic import make_synthetic
from efficientllava.models.tiny import TinyConfig, build_tiny
from efficientllava.prompting import COMPACT, encode_batches

# One intra-op thread: tiny matmuls on a busy 2-core machine are far slower with two (spin-waits).
torch.set_num_threads(1)

SMALL = TinyConfig(text_layers=2, text_hidden=64, text_intermediate=128, vision_layers=1)


@pytest.fixture(scope="session")
def small_model():
    """A random 2-layer tiny LLaVA and its processor (session-wide: do not modify it in place)."""
    return build_tiny(SMALL)


@pytest.fixture(scope="session")
def small_batches(small_model):
    """16 synthetic samples encoded for `small_model`, in batches of 8."""
    _, processor = small_model
    return encode_batches(processor, make_synthetic(16, 0, "train"), 8, COMPACT)
