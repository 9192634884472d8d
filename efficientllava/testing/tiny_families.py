"""Small random-weight checkpoints of every supported model family, built offline (tests only).

Each builder returns a real transformers model of its family's class (2 decoder layers, hidden
32, grouped-query attention so that q and k/v differ in shape) and its real processor class, with
a word-level tokenizer built locally (as `models.tokenizer` does for the tiny model) and the
image processor's PIL backend (torchvision is not needed). Images are the synthetic task's
32 px renderings. `save_tiny_family` writes one in HF layout for tests that load it by path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from efficientllava.data.synthetic import question_words
from efficientllava.families import family_for
from efficientllava.families.prompts import LETTERS, MC_INSTRUCTION, OPEN_INSTRUCTION
from efficientllava.models.tokenizer import build_word_tokenizer

CHAT_SPECIAL = ("<|im_start|>", "<|im_end|>")
# A ChatML template (as Qwen2-VL and LLaVA-OneVision use) with the image placeholder `{image}`.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}{image}{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Mistral's [INST] template (as llava-v1.6-mistral uses).
MISTRAL = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% for c in m['content'] %}"
           "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]"
           "{% endif %}{% endfor %}")
SEED = 0

Built = tuple[Any, Any]  # (a transformers model, its processor)


def _tokenizer(extra_special: tuple[str, ...] = (), image_token: str = "<image>") -> Any:
    words = [*question_words(), MC_INSTRUCTION, OPEN_INSTRUCTION, "Context : user assistant INST",
             " ".join(f"{c} ." for c in LETTERS)]
    return build_word_tokenizer(words, extra_special=extra_special, image_token=image_token)


def _text_config(kind: str, tokenizer: Any) -> Any:
    """A 2-layer decoder config (LLaMA or Qwen2) with grouped-query attention."""
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    return cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)


def _clip() -> Any:
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=16, patch_size=8, projection_dim=32)


def _model(cls_name: str, config: Any) -> nn.Module:
    torch.manual_seed(SEED)
    model: nn.Module = getattr(transformers, cls_name)(config)
    return model.eval()


def build_llava() -> Built:
    """LLaVA-1.5: CLIP at 16 px (4 patches + CLS), LLaMA decoder, no chat template (the llava-1.5 prompt)."""
    tok = _tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size=16),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)
    config = transformers.LlavaConfig(vision_config=_clip(), text_config=_text_config("llama", tok),
                                      image_token_index=image_id, vision_feature_select_strategy="default",
                                      vision_feature_layer=-1)
    return _model("LlavaForConditionalGeneration", config), processor


GRID = [[16, 32], [32, 16], [32, 32]]  # AnyRes: a 32 px image becomes a 16 px base crop + 2x2 crops


def build_llava_next() -> Built:
    """LLaVA-NeXT: AnyRes crops of 16 px, LLaMA decoder, Mistral chat template."""
    tok = _tokenizer(("[INST]", "[/INST]"))
    processor = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size=16,
                                                                 image_grid_pinpoints=GRID),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=MISTRAL)
    config = transformers.LlavaNextConfig(vision_config=_clip(), text_config=_text_config("llama", tok),
                                          image_token_index=tok.convert_tokens_to_ids("<image>"),
                                          image_grid_pinpoints=GRID, vision_feature_select_strategy="default",
                                          vision_feature_layer=-1)
    return _model("LlavaNextForConditionalGeneration", config), processor


def build_llava_onevision() -> Built:
    """LLaVA-OneVision: SigLIP (no CLS) with AnyRes crops, Qwen2 decoder, ChatML template."""
    tok = _tokenizer(CHAT_SPECIAL)
    grid = [[16, 16], *GRID]
    image_processor = transformers.LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                                                   image_grid_pinpoints=grid)
    processor = family_for("llava_onevision").processor_class()(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=4, vision_feature_select_strategy="full",
        image_token="<image>", chat_template=CHATML.replace("{image}", "<image>\n"))
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8)
    config = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=_text_config("qwen2", tok),
                                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                                               image_grid_pinpoints=grid, vision_feature_select_strategy="full",
                                               vision_feature_layer=-1)
    return _model("LlavaOnevisionForConditionalGeneration", config), processor


QWEN_SPECIAL = (*CHAT_SPECIAL, "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")


def _build_qwen(model_type: str, vision: dict[str, Any]) -> Built:
    """Qwen2-VL / Qwen2.5-VL: 8 px patches, 32x32 px images (4x4 patches, 2x2 merged: 4 LLM tokens each)."""
    family = family_for(model_type)
    tok = _tokenizer(QWEN_SPECIAL, image_token="<|image_pad|>")
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8,
                                                            temporal_patch_size=2, merge_size=2)
    processor = family.processor_class()(
        image_processor=image_processor, tokenizer=tok,
        chat_template=CHATML.replace("{image}", "<|vision_start|><|image_pad|><|vision_end|>"))
    text = _text_config("qwen2", tok).to_dict()
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}  # head_dim 16: 8 rotary pairs
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config_cls = {"qwen2_vl": transformers.Qwen2VLConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig}[model_type]
    config = config_cls(vision_config={**vision, "patch_size": 8, "temporal_patch_size": 2, "spatial_merge_size": 2,
                                       "in_channels": 3, "depth": 1, "num_heads": 2},
                        text_config=text, **ids)
    return _model(family.model_class_name, config), processor


def build_qwen2_vl() -> Built:
    """Qwen2-VL with a 1-block vision transformer."""
    return _build_qwen("qwen2_vl", {"embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2})


def build_qwen2_5_vl() -> Built:
    """Qwen2.5-VL with a 1-block vision transformer (full attention in that block)."""
    return _build_qwen("qwen2_5_vl", {"hidden_size": 32, "out_hidden_size": 32, "intermediate_size": 64,
                                      "window_size": 16, "fullatt_block_indexes": [0]})


TINY_BUILDERS: dict[str, Callable[[], Built]] = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
}


def save_tiny_family(model_type: str, path: str | Path) -> Path:
    """Build the small random checkpoint of `model_type` and save it (model + processor) to `path`."""
    model, processor = TINY_BUILDERS[model_type]()
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
