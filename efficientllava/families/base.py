"""The model-family seam: where a LLaVA-style model keeps what pruning, scoring and export need, and a registry.

A family is one subclass of `ModelFamily` in its own file, registered by `config.model_type`
(EvoPress's `get_layers`, grown up). It says which transformers class loads the checkpoint,
where the language model's decoder layers and their prunable linears are (by role: q, k, v, o,
gate, up, down), which module is the vision-to-language projector and which the vision tower,
which forward inputs its processor produces, how it is prompted, and how many tokens an
encoded batch sends through the vision tower and the LLM (dynamic resolution: counted from
the batch). Every registered family passes the contract suite in
`efficientllava.testing.family_contract`.

Batches stay family-agnostic: a batch is the model's forward inputs plus our own keys
(`OWN_KEYS`), so `model_inputs(batch)` is the batch minus those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import transformers
from torch import nn

from efficientllava.errors import ConfigError, ModelLoadError
from efficientllava.families.prompts import (
    CHAT,
    COMPACT,
    answer_stub,
    build_prompt,
    chat_prompt,
    letter_ids_after,
)

# Keys of an encoded batch that are ours, not the model's: the answer position, the option-letter
# token ids, the correct letter's id, the correct option's index, the teacher-forced answer tokens.
OWN_KEYS = frozenset({"answer_pos", "option_ids", "labels", "answers", "answer_ids", "labelled"})
ROLES = ("q", "k", "v", "o", "gate", "up", "down")  # the prunable linears of a decoder layer
LLAMA_LINEARS: Mapping[str, str] = {  # LLaMA, Vicuna, Mistral, Qwen2: one layout
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of an encoded batch that is passed to the model's forward (everything but OWN_KEYS)."""
    return {k: v for k, v in batch.items() if k not in OWN_KEYS}


@dataclass(frozen=True)
class TokenCounts:
    """Mean tokens per sample of encoded batches: what the cost model multiplies weights by."""

    tokens: float  # LLM sequence length (image tokens included)
    image_tokens: float  # tokens the projector writes into the LLM
    vision_tokens: float  # tokens through the vision tower (all crops / patches, CLS included)
    vision_attention: float  # sum over the vision tower's attention sequences of length^2


def _image_only(cls: type) -> type:
    """`cls` (a multimodal processor) without its video processor, under the same class name.

    transformers' processors for LLaVA-OneVision and Qwen2-VL insist on a video processor, whose
    classes need torchvision even when no video is ever passed. Scoring uses images only, so the
    processor is built from its image processor and tokenizer alone: the same with or without
    torchvision, and for checkpoints saved without a video processor.
    """

    class ImageOnly(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def get_attributes(klass) -> list[str]:
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__  # save_pretrained records the real class
    return ImageOnly


class ModelFamily:
    """One model family (subclass per family; override what differs from LLaVA-1.5 on a LLaMA-style decoder)."""

    model_type: ClassVar[str]  # config.model_type it is registered under
    title: ClassVar[str]  # e.g. "LLaVA-1.5"
    model_class_name: ClassVar[str]  # the transformers class that loads it (`from_pretrained`)
    processor_class_name: ClassVar[str]
    forward_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "pixel_values")
    optional_inputs: ClassVar[tuple[str, ...]] = ()  # forward inputs kept when the processor returns them
    decoder_path: ClassVar[str] = "model.language_model.layers"
    linear_paths: ClassVar[Mapping[str, str]] = LLAMA_LINEARS  # role -> path inside a decoder layer
    projector_path: ClassVar[str] = "model.multi_modal_projector"
    vision_path: ClassVar[str] = "model.vision_tower"
    # (module-name prefix, checkpoint-key prefix): save_pretrained may write the original layout.
    checkpoint_prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()
    prompt_formats: ClassVar[tuple[str, ...]] = (CHAT, COMPACT)
    default_prompt_format: ClassVar[str] = CHAT
    video_processor: ClassVar[bool] = False  # whether transformers' processor class insists on a video processor

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.model_type}>"

    # -- loading -----------------------------------------------------------------------------

    def model_class(self) -> type[transformers.PreTrainedModel]:
        """The transformers class whose `from_pretrained` loads this family's checkpoints."""
        return getattr(transformers, self.model_class_name)  # type: ignore[no-any-return]

    def processor_class(self) -> type:
        """The processor class (image-only where transformers' class also wants a video processor)."""
        cls = getattr(transformers, self.processor_class_name)
        return _image_only(cls) if self.video_processor else cls  # type: ignore[no-any-return]

    def load_processor(self, source: str) -> Any:
        """The checkpoint's processor (`from_pretrained`)."""
        if self.video_processor:
            return self.processor_class().from_pretrained(source)  # type: ignore[attr-defined]
        return transformers.AutoProcessor.from_pretrained(source)

    def num_layers(self, config: Any) -> int:
        """Decoder layers of the language model, from the config alone."""
        return int(config.text_config.num_hidden_layers)

    # -- modules -----------------------------------------------------------------------------

    def _module(self, model: nn.Module, path: str, what: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"{type(model).__name__} has no {what} at {path!r}, where the {self.title} "
                              f"family keeps it; is config.model_type {self.model_type!r} right?") from None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers."""
        layers = self._module(model, self.decoder_path, "decoder layer list")
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"{type(model).__name__}.{self.decoder_path} is not a layer list")
        return layers

    def layer_linears(self, layer: int) -> dict[str, str]:
        """Role -> full module name of decoder layer `layer`'s prunable linears, in ROLES order."""
        return {role: f"{self.decoder_path}.{layer}.{self.linear_paths[role]}" for role in ROLES}

    def projector(self, model: nn.Module) -> nn.Module:
        """The vision-to-language projector (what projector optimisation trains)."""
        return self._module(model, self.projector_path, "projector")

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The vision encoder (for the cost model; it may contain the projector)."""
        return self._module(model, self.vision_path, "vision tower")

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection to vocabulary logits."""
        head = model.get_output_embeddings()  # type: ignore[operator]
        assert isinstance(head, nn.Module)
        return head

    def image_token_id(self, config: Any) -> int:
        """Token id of the image placeholder the processor expands and the model fills with image features."""
        value = getattr(config, "image_token_id", None)
        return int(value if value is not None else config.image_token_index)

    # -- prompts and batches -------------------------------------------------------------------

    def check_prompt_format(self, fmt: str) -> None:
        """ConfigError unless this family can be prompted in `fmt`."""
        if fmt not in self.prompt_formats:
            raise ConfigError(f"unknown prompt format {fmt!r} for {self.title}; use one of "
                              f"{', '.join(self.prompt_formats)}")

    def prompt(self, processor: Any, fmt: str, question: str, options: Sequence[str], context: str) -> str:
        """One sample's prompt text; multiple choice with lettered options, or open-ended when `options` is empty."""
        self.check_prompt_format(fmt)
        if fmt == CHAT:
            return chat_prompt(processor, question, options, context)
        return build_prompt(question, options, context, fmt, processor.image_token)

    def letter_token_ids(self, processor: Any, fmt: str, n: int) -> list[int]:
        """Token id of each of the first `n` option letters as the answer's first token in format `fmt`."""
        self.check_prompt_format(fmt)
        stub = self.prompt(processor, CHAT, "", [], "") if fmt == CHAT else answer_stub(fmt)
        return letter_ids_after(processor.tokenizer, stub, n)

    def encode(self, processor: Any, images: Sequence[Any], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's forward inputs for `images` and `texts` (one image per text), right padded."""
        enc = processor(images=list(images), text=list(texts), return_tensors="pt", padding=True)
        missing = [k for k in self.forward_inputs if k not in enc]
        if missing:
            raise ConfigError(f"{type(processor).__name__} returned no {', '.join(missing)}, which "
                              f"{self.title} models take; is this the checkpoint's own processor?")
        return {k: enc[k] for k in (*self.forward_inputs, *self.optional_inputs) if k in enc}

    # -- forward -----------------------------------------------------------------------------

    def hidden_states(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The language model's last hidden states [batch, seq, hidden] (no lm_head: logits only where needed)."""
        base: Any = model.model
        return base(**model_inputs(batch)).last_hidden_state  # type: ignore[no-any-return]

    def answer_logits(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Vocabulary logits at each sample's answer position, [batch, vocab]."""
        hidden = self.hidden_states(model, batch)
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["answer_pos"]]
        return self.lm_head(model)(rows)  # type: ignore[no-any-return]

    # -- cost ----------------------------------------------------------------------------------

    def vision_sequences(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[int]:
        """Length of each attention sequence the vision tower runs for `batch` (all samples)."""
        raise NotImplementedError

    def fixed_token_counts(self, model: nn.Module, tokens: int) -> TokenCounts | None:
        """Token counts of a sample of `tokens` LLM tokens when every image costs the same (fixed resolution).

        None for dynamic-resolution families: count those from encoded batches (`token_counts`).
        """
        return None

    def vision_dims(self, config: Any) -> tuple[int, int]:
        """(layers, hidden size) of the vision tower."""
        vc = config.vision_config
        return int(vc.num_hidden_layers), int(vc.hidden_size)

    def token_counts(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> TokenCounts:
        """Mean LLM, image and vision tokens per sample, counted from encoded batches."""
        config: Any = model.config
        image_id = self.image_token_id(config)
        n = tokens = image = 0
        vision: list[int] = []
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            n += int(ids.shape[0])
            tokens += int(mask.sum())
            image += int(((ids == image_id) & (mask == 1)).sum())
            vision += self.vision_sequences(model, batch)
        if n == 0:
            raise ConfigError("token counts need at least one encoded sample")
        return TokenCounts(tokens / n, image / n, sum(vision) / n, sum(v * v for v in vision) / n)

    def checkpoint_key(self, name: str, keys: set[str]) -> str:
        """The key of module `name`'s weight in a saved checkpoint (the current or the original layout)."""
        key = f"{name}.weight"
        if key in keys:
            return key
        for prefix, saved in self.checkpoint_prefixes:
            if key.startswith(prefix) and saved + key[len(prefix):] in keys:
                return saved + key[len(prefix):]
        raise ConfigError(f"cannot find the weight of {name} in the checkpoint (looked for {key} and its "
                          f"{self.title} legacy names); the checkpoint does not come from this model")


def has_class_token(vision: nn.Module) -> bool:
    """Whether a ViT prepends a CLS token (CLIP does, SigLIP does not)."""
    return any(name.endswith("class_embedding") for name, _ in vision.named_parameters())


def vit_tokens(vision: nn.Module, height: int, width: int, patch_size: int) -> int:
    """Tokens a ViT encodes for one crop: its patches, plus CLS when the tower has one."""
    return (height // patch_size) * (width // patch_size) + int(has_class_token(vision))


# -- registry --------------------------------------------------------------------------------------

_REGISTRY: dict[str, ModelFamily] = {}
F = TypeVar("F", bound=type[ModelFamily])


def register_family(cls: F) -> F:
    """Class decorator: register one instance of `cls` under `cls.model_type`."""
    if cls.model_type in _REGISTRY:
        raise ValueError(f"model family {cls.model_type!r} is registered twice")
    _REGISTRY[cls.model_type] = cls()
    return cls


def family_names() -> list[str]:
    """The supported `config.model_type` values, in registration order."""
    return list(_REGISTRY)


def family_for(model_type: str | None) -> ModelFamily:
    """The family registered for `model_type`; a one-line ModelLoadError listing the supported ones otherwise."""
    family = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ModelLoadError(f"model_type {model_type!r} is not a supported model family; "
                             f"supported: {', '.join(family_names())}")
    return family


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a loaded model, from its `config.model_type`."""
    return family_for(getattr(getattr(model, "config", None), "model_type", None))


def family_of_processor(processor: Any) -> ModelFamily:
    """The family whose processor class `processor` is (the one that builds its batches)."""
    for family in _REGISTRY.values():  # by exact name: e.g. Qwen2_5_VLProcessor may subclass Qwen2VLProcessor
        if family.processor_class_name == type(processor).__name__:
            return family
    raise ConfigError(f"{type(processor).__name__} is not the processor of a supported model family "
                      f"({', '.join(family_names())})")
