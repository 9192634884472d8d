"""Model loading: HF-layout round trips, clear errors for bad specs, the tiny model's cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from efficientllava.data.synthetic import make_synthetic
from efficientllava.errors import ModelLoadError
from efficientllava.models import load_model, resolve_device, resolve_dtype
from efficientllava.models import tiny as tiny_module
from efficientllava.models.tiny import META_FILE, TinyConfig, build_tiny, ensure_tiny
from efficientllava.prompting import COMPACT, LLAVA_15, encode_batches, model_inputs

# A text backbone unlike the conftest's SMALL one (3 layers, hidden 96, 3 heads).
OTHER = TinyConfig(text_layers=3, text_hidden=96, text_heads=3, text_intermediate=192, vision_layers=1)
# Small enough to train in about a second (3 optimiser steps: 2 multiple-choice batches, 1 open-ended one).
# open_samples is set too: left at its default (6000) the open-ended data alone takes half a minute to build.
QUICK = TinyConfig(
    text_layers=1,
    text_hidden=32,
    text_intermediate=64,
    vision_layers=1,
    train_samples=128,
    open_samples=64,
    epochs=1,
    eval_samples=64,
)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """OTHER built at random and saved in HF layout (no efficientllava.json): (model, processor, dir)."""
    model, processor = build_tiny(OTHER)
    model.eval()
    path = tmp_path_factory.mktemp("other") / "ckpt"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor, path


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of a checkpoint directory that a test may modify."""
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def _one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def test_load_local_checkpoint_round_trip(other_checkpoint):
    model, processor, path = other_checkpoint
    loaded = load_model(str(path), device="cpu")
    assert type(loaded.model) is LlavaForConditionalGeneration
    text = loaded.model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (3, 96, 3)
    assert len(loaded.model.model.language_model.layers) == 3
    assert loaded.model.config.vision_config.num_hidden_layers == 1
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.spec == str(path) and loaded.path == str(path)
    assert loaded.num_parameters == sum(p.numel() for p in model.parameters())
    # The processor round-trips: same vocabulary, same image token and id.
    assert loaded.processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.processor.image_token == processor.image_token == "<image>"
    assert (
        loaded.processor.tokenizer.convert_tokens_to_ids("<image>") == loaded.model.config.image_token_index
    )
    # No efficientllava.json: a real LLaVA checkpoint, prompted as LLaVA-1.5 does.
    assert loaded.prompt_format == LLAVA_15


def test_reloaded_model_gives_the_original_logits(other_checkpoint):
    model, processor, path = other_checkpoint
    loaded = load_model(str(path), device="cpu")
    data = make_synthetic(8, 0, "train")
    original = encode_batches(processor, data, 4, COMPACT)
    reloaded = encode_batches(loaded.processor, data, 4, COMPACT)
    with torch.no_grad():
        for a, b in zip(original, reloaded, strict=True):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
            assert torch.equal(model(**model_inputs(a)).logits, loaded.model(**model_inputs(b)).logits)


def test_prompt_format_comes_from_efficientllava_json(other_checkpoint, tmp_path):
    path = _copy(other_checkpoint[2], tmp_path)
    (path / META_FILE).write_text(json.dumps({"prompt_format": COMPACT}))
    assert load_model(str(path), device="cpu").prompt_format == COMPACT
    (path / META_FILE).write_text(json.dumps({"note": "no format given"}))
    assert load_model(str(path), device="cpu").prompt_format == LLAVA_15


def test_explicit_dtype(other_checkpoint):
    loaded = load_model(str(other_checkpoint[2]), dtype="bf16", device="cpu")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_tiny_spec_uses_the_tiny_cache(other_checkpoint, tmp_path, monkeypatch):
    path = _copy(other_checkpoint[2], tmp_path)
    (path / META_FILE).write_text(json.dumps({"prompt_format": COMPACT}))
    monkeypatch.setattr(tiny_module, "ensure_tiny", lambda: path)  # do not train the default model
    loaded = load_model("tiny", device="cpu")
    assert (loaded.spec, loaded.path, loaded.prompt_format) == ("tiny", str(path), COMPACT)


@pytest.mark.parametrize("spec", ["tinyy", "not a model", "./no/such/dir", "/no/such/checkpoint"])
def test_unknown_spec(spec):
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(spec, device="cpu")
    _one_line_error(excinfo, repr(spec), "tiny", "local checkpoint")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(str(tmp_path), device="cpu")
    _one_line_error(excinfo, str(tmp_path), "no config.json")


def test_non_llava_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(str(tmp_path), device="cpu")
    _one_line_error(excinfo, "'bert'", "not a LLaVA checkpoint")


@pytest.mark.parametrize("text, needle", [("{not json", "cannot read it as JSON"), ("[1, 2]", "JSON object")])
def test_corrupt_config(tmp_path, text, needle):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(str(tmp_path), device="cpu")
    _one_line_error(excinfo, "config.json", needle)


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json"])
def test_incomplete_local_checkpoint(other_checkpoint, tmp_path, missing):
    path = _copy(other_checkpoint[2], tmp_path)
    (path / missing).unlink()
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(str(path), device="cpu")
    msg = _one_line_error(excinfo, str(path), "incomplete checkpoint", "save_pretrained")
    assert "hf download" not in msg  # a local directory: hub advice would mislead


@pytest.mark.parametrize(
    "meta, needle",
    [('{"prompt_format": "vicuna"}', "unknown prompt_format 'vicuna'"), ("{oops", "cannot read it as JSON")],
)
def test_bad_efficientllava_json(other_checkpoint, tmp_path, meta, needle):
    path = _copy(other_checkpoint[2], tmp_path)
    (path / META_FILE).write_text(meta)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(str(path), device="cpu")
    _one_line_error(excinfo, META_FILE, needle)


def test_unreachable_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so the id cannot also be a relative directory
    spec = "efficientllava-tests/no-such-llava"
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(spec, device="cpu")
    _one_line_error(excinfo, repr(spec), f"hf download {spec} --local-dir DIR", "pass DIR as the model")


def test_cuda_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ModelLoadError) as excinfo:
            resolve_device(device)
        _one_line_error(excinfo, repr(device), "no CUDA GPU", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_index_beyond_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_device("cuda:3")
    _one_line_error(excinfo, "'cuda:3'", "1 CUDA GPU")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", ""])
def test_unknown_device(device):
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_device(device)
    _one_line_error(excinfo, f"unknown device {device!r}", "cpu")


def test_dtypes():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_dtype("int8", cpu)
    _one_line_error(excinfo, "unknown dtype 'int8'", "float32")


def test_unknown_dtype_through_load_model(other_checkpoint):
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp64'"):
        load_model(str(other_checkpoint[2]), dtype="fp64", device="cpu")


def test_tiny_config_key():
    assert QUICK.key() == TinyConfig(**{**QUICK.__dict__}).key()
    assert len(QUICK.key()) == 12
    assert len({QUICK.key(), TinyConfig().key(), TinyConfig(seed=1).key(), TinyConfig(lr=1e-3).key()}) == 4


def test_ensure_tiny_trains_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTLLAVA_HOME", str(tmp_path))
    path = ensure_tiny(QUICK)
    assert path == tmp_path / "models" / f"tiny-{QUICK.key()}"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    meta = json.loads((path / META_FILE).read_text())
    assert meta["prompt_format"] == COMPACT and meta["key"] == QUICK.key()
    assert meta["tiny_config"]["text_layers"] == 1
    assert not list(path.parent.glob(".tmp-*"))  # the staging directory is gone
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tiny model was trained again")

    monkeypatch.setattr(tiny_module, "train_tiny", no_training)
    assert ensure_tiny(QUICK) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    loaded = load_model(str(path), device="cpu")
    assert loaded.prompt_format == COMPACT
    assert loaded.model.config.text_config.num_hidden_layers == 1


def test_ensure_tiny_retrains_a_half_written_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTLLAVA_HOME", str(tmp_path))
    final = tmp_path / "models" / f"tiny-{QUICK.key()}"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # no efficientllava.json: an interrupted old write
    assert ensure_tiny(QUICK) == final
    assert (final / META_FILE).is_file()
    assert json.loads((final / "config.json").read_text())["model_type"] == "llava"


def test_ensure_tiny_failed_training_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTLLAVA_HOME", str(tmp_path))

    def crash(cfg, out_dir, *args, **kwargs):
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(tiny_module, "train_tiny", crash)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_tiny(QUICK)
    models = tmp_path / "models"
    assert not (models / f"tiny-{QUICK.key()}").exists()
    assert not list(models.glob(".tmp-*"))


def test_tiny_training_is_deterministic(tmp_path, monkeypatch):
    weights = []
    for home in ("a", "b"):
        monkeypatch.setenv("EFFICIENTLLAVA_HOME", str(tmp_path / home))
        path = ensure_tiny(QUICK)
        assert path.is_relative_to(tmp_path / home)
        assert load_file(path / "model.safetensors")  # weights written
        weights.append(load_model(str(path), device="cpu").model.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # Training moved the weights away from the seeded random initialisation.
    init = build_tiny(QUICK)[0].state_dict()
    assert init.keys() == weights[0].keys()
    assert any(not torch.equal(init[k], weights[0][k]) for k in init)


def test_shipped_tiny_weights_match_the_config_and_answer_the_task():
    """The packaged weights are the default TinyConfig's (regenerate: python -m efficientllava.models.tiny)."""
    from efficientllava.data.synthetic import generate
    from efficientllava.models.tiny import (
        SHIPPED_DIR,
        open_answer_accuracy,
        open_batches,
        rows_to_dataset,
        shipped_tiny,
    )
    from efficientllava.prompting import encode_batches
    from efficientllava.scoring.accuracy import evaluate_accuracy

    meta = json.loads((SHIPPED_DIR / META_FILE).read_text())
    assert meta["key"] == TinyConfig().key(), "TinyConfig changed: regenerate with python -m efficientllava.models.tiny"
    assert shipped_tiny() == SHIPPED_DIR and ensure_tiny() == SHIPPED_DIR
    loaded = load_model("tiny", device="cpu")
    assert loaded.path == str(SHIPPED_DIR)
    rows = generate(256, 123, "heldout")  # a stream the model never trained on
    processor = loaded.processor
    mc = evaluate_accuracy(loaded.model, encode_batches(processor, rows_to_dataset(rows), 128, COMPACT)).accuracy
    open_ended = open_answer_accuracy(loaded.model, open_batches(rows, processor, 128))
    assert mc >= 0.9 and open_ended >= 0.9, (mc, open_ended)
