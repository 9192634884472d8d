"""The family registry and adapters' error paths: one clear line for each thing a family cannot do."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from efficientllava.errors import ConfigError, ModelLoadError
from efficientllava.families import OWN_KEYS, family_for, family_names, family_of, model_inputs
from efficientllava.families.base import family_of_processor
from efficientllava.families.prompts import CHAT
from efficientllava.models.loading import load_model
from efficientllava.scoring.cost import CostModel
from efficientllava.testing.tiny_families import TINY_BUILDERS, build_llava, build_qwen2_vl


def test_registry_lists_the_supported_model_types():
    assert family_names() == ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
    assert {family_for(t).title for t in family_names()} == {
        "LLaVA-1.5", "LLaVA-NeXT", "LLaVA-OneVision", "Qwen2-VL", "Qwen2.5-VL"}
    with pytest.raises(ModelLoadError, match="model_type None is not a supported model family"):
        family_of(nn.Linear(2, 2))


def test_model_inputs_drop_exactly_our_keys():
    batch = {k: torch.zeros(1) for k in (*OWN_KEYS, "input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}


def test_wrong_layout_is_named():
    model, processor = build_llava()
    qwen = family_for("qwen2_vl")
    with pytest.raises(ConfigError, match="no projector at 'model.visual.merger'.*Qwen2-VL"):
        qwen.projector(model)
    with pytest.raises(ConfigError, match="cannot find the weight of x.y"):
        family_of(model).checkpoint_key("x.y", {"language_model.model.layers.0.mlp.up_proj.weight"})
    llava = family_of(model)
    key = llava.checkpoint_key("model.language_model.layers.0.mlp.up_proj",
                               {"language_model.model.layers.0.mlp.up_proj.weight"})
    assert key == "language_model.model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ConfigError, match="not the processor of a supported model family"):
        family_of_processor(object())
    with pytest.raises(ConfigError, match="returned no image_grid_thw"):
        qwen.encode(processor, [Image.new("RGB", (32, 32))], ["<image> q"])  # LLaVA's processor cannot feed Qwen2-VL
    with pytest.raises(ConfigError, match="unknown prompt format 'llava-1.5' for Qwen2-VL"):
        qwen.prompt(processor, "llava-1.5", "q", [], "")


def test_dynamic_resolution_needs_counted_tokens():
    model, _ = build_qwen2_vl()
    with pytest.raises(ConfigError, match="Qwen2-VL sizes images dynamically.*from_batches"):
        CostModel.from_model(model, "layer", tokens_per_sample=10)


def test_processors_without_a_video_processor_keep_their_class_name():
    for model_type in ("llava_onevision", "qwen2_vl", "qwen2_5_vl"):
        _, processor = TINY_BUILDERS[model_type]()
        assert type(processor).__name__ == family_for(model_type).processor_class_name
        assert "video_processor" not in type(processor).get_attributes()


def test_chat_prompt_needs_a_chat_template(tmp_path):
    model, processor = build_llava()  # LLaVA-1.5's tiny processor has no chat template
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert load_model(str(tmp_path), device="cpu").prompt_format == "llava-1.5"
    (tmp_path / "efficientllava.json").write_text(json.dumps({"prompt_format": CHAT}))
    with pytest.raises(ModelLoadError, match="no chat template, which prompt_format 'chat' needs") as excinfo:
        load_model(str(tmp_path), device="cpu")
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ConfigError, match="has no chat template"):
        family_of(model).prompt(processor, CHAT, "q", ["a"], "")
