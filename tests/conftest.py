"""Shared fixtures: small random LLaVA models and encoded synthetic batches (no downloads).

Plain helpers live in `helpers.py` (tests import them from there, never from this file)."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from helpers import MAGNITUDE_SPEC, SMALL

from efficientllava.data.synthetic import make_synthetic
from efficientllava.models.tiny import build_tiny
from efficientllava.prompting import COMPACT, encode_batches
from efficientllava.pruning.bank import build_bank
from efficientllava.pruning.materialize import Materializer


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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster (2 CPUs) for every in-process search test of the session, started on first use.

    Its own short temp dir (Ray's socket paths), and every process of it killed at the end (never `ray stop`:
    other clusters may share the machine). Searches name their actors after their experiment, so tests that
    share the cluster do not see each other's workers.
    """
    import ray
    from rayprocs import kill_ray

    from efficientllava.search.workers import NAMESPACE

    marker = tempfile.mkdtemp(prefix="els", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, _temp_dir=marker)
    yield
    ray.shutdown()
    kill_ray(marker)
    shutil.rmtree(marker, ignore_errors=True)
