"""The built-in tiny LLaVA: built from a config, trained on the synthetic task, cached in HF layout.

It is a real `LlavaForConditionalGeneration` (CLIP vision tower, 2-layer MLP projector, Llama
decoder) saved with `save_pretrained`, so everything downstream loads it through the same
`from_pretrained` path as `llava-hf/llava-1.5-7b-hf`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from efficientllava.data.synthetic import IMAGE_SIZE, generate, question_words
from efficientllava.filelock import file_lock
from efficientllava.log import get_logger
from efficientllava.models.tokenizer import build_word_tokenizer
from efficientllava.prompting import (
    COMPACT,
    build_prompt,
    encode_answer_batches,
    encode_batches,
    model_inputs,
)
from efficientllava.scoring.accuracy import evaluate_accuracy

logger = get_logger(__name__)

FORMAT_VERSION = 2  # bump when the training recipe changes, so old caches are not reused
META_FILE = "efficientllava.json"  # prompt format and provenance, next to config.json


@dataclass(frozen=True)
class TinyConfig:
    """Architecture and training recipe of the built-in tiny model; its hash keys the cache."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    patch_size: int = 16  # one image token per quadrant of the 32 px synthetic images
    text_hidden: int = 128
    text_intermediate: int = 256
    text_layers: int = 6
    text_heads: int = 4
    train_samples: int = 12000  # multiple-choice samples (answer: the option letter)
    open_samples: int = 6000  # open-ended samples of the same task (answer: the colour / shape / count word)
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    threads: int = 1
    seed: int = 0
    eval_samples: int = 512

    def key(self) -> str:
        """Stable short hash of the config and recipe version."""
        blob = json.dumps({**dataclasses.asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def home_dir() -> Path:
    """The cache root: $EFFICIENTLLAVA_HOME, default ~/.cache/efficientllava."""
    return Path(os.environ.get("EFFICIENTLLAVA_HOME", Path.home() / ".cache" / "efficientllava"))


def build_tiny(cfg: TinyConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA and its processor (offline word-level tokenizer)."""
    tokenizer = build_word_tokenizer([*question_words(), build_prompt("", [], "", COMPACT, "<image>")])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=IMAGE_SIZE, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden,
                       intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
                       num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_heads,
                       max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu")
    torch.manual_seed(cfg.seed)
    return LlavaForConditionalGeneration(config), processor


def _scene_targets(rows: list[dict], tokenizer, batch_size: int, n_quadrants: int) -> list[torch.Tensor]:
    """Per image token (one per quadrant) a soft target over {its shape, its colour} or 'nothing'."""
    vocab, nothing = len(tokenizer), tokenizer.convert_tokens_to_ids("nothing")
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        target = torch.zeros(len(chunk), n_quadrants, vocab)
        target[:, :, nothing] = 1.0
        for i, row in enumerate(chunk):
            for quadrant, shape, color in row["objects"]:
                target[i, quadrant, nothing] = 0.0
                target[i, quadrant, tokenizer.convert_tokens_to_ids(shape)] = 0.5
                target[i, quadrant, tokenizer.convert_tokens_to_ids(color)] = 0.5
        out.append(target)
    return out


def open_batches(rows: list[dict], processor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The rows as open-ended questions (no options): the target is the answer word, then EOS."""
    prompts = [build_prompt(r["question"], [], r["context"], COMPACT, processor.image_token) for r in rows]
    answers = [r["options"][r["answer"]] for r in rows]
    return encode_answer_batches(processor, [r["image"] for r in rows], prompts, answers, batch_size)


def _answer_loss(model, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer: the option letter (multiple choice) or the answer tokens + EOS (open)."""
    rows_idx = torch.arange(hidden.shape[0])
    if "answer_ids" not in batch:
        return F.cross_entropy(model.lm_head(hidden[rows_idx, batch["answer_pos"]]), batch["labels"])
    targets = batch["answer_ids"]
    pos = (batch["answer_pos"][:, None] + torch.arange(targets.shape[1])).clamp(max=hidden.shape[1] - 1)
    logits = model.lm_head(hidden[rows_idx[:, None], pos])
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def train_tiny(cfg: TinyConfig, out_dir: Path, log: bool = True) -> dict:
    """Train a tiny LLaVA on the synthetic task (deterministic given cfg.seed) and save it to `out_dir`.

    Loss: the answer's next-token cross-entropy (as LLaVA is trained: the option letter for
    multiple-choice samples, the answer word then EOS for open-ended ones) plus an auxiliary
    scene loss at the image tokens (each names its quadrant's shape and colour through lm_head),
    which lets a from-scratch vision tower learn in a few hundred steps instead of thousands.
    """
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # deterministic and immune to spin-waits on a busy machine
    torch.manual_seed(cfg.seed)
    model, processor = build_tiny(cfg)
    n_quadrants = (IMAGE_SIZE // cfg.patch_size) ** 2
    rows = generate(cfg.train_samples, cfg.seed, "pretrain")
    train = encode_batches(processor, rows_to_dataset(rows), cfg.batch_size, COMPACT)
    scenes = _scene_targets(rows, processor.tokenizer, cfg.batch_size, n_quadrants)
    if cfg.open_samples:
        # A separate seed stream of the pretraining split: other images than the multiple-choice ones.
        open_rows = generate(cfg.open_samples, cfg.seed + 7919, "pretrain")
        train += open_batches(open_rows, processor, cfg.batch_size)
        scenes += _scene_targets(open_rows, processor.tokenizer, cfg.batch_size, n_quadrants)
    held_rows = generate(cfg.eval_samples, cfg.seed + 1, "pretrain")
    heldout = encode_batches(processor, rows_to_dataset(held_rows), 128, COMPACT)
    heldout_open = open_batches(held_rows, processor, 128)
    image_id = model.config.image_token_index
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    total = cfg.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for epoch in range(cfg.epochs):
        for i in torch.randperm(len(train), generator=gen).tolist():
            batch = train[i]
            hidden = model.model(**model_inputs(batch)).last_hidden_state
            image = model.lm_head(hidden[batch["input_ids"] == image_id])
            loss = _answer_loss(model, hidden, batch) + F.cross_entropy(image, scenes[i].flatten(0, 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        if log:
            model.eval()
            acc, open_acc = evaluate_accuracy(model, heldout).accuracy, open_answer_accuracy(model, heldout_open)
            model.train()
            logger.info(f"tiny model: epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.3f}, "
                        f"held-out accuracy {acc:.3f} (open-ended {open_acc:.3f}) ({time.perf_counter() - start:.0f}s)")
    model.eval()
    meta = {"prompt_format": COMPACT, "tiny_config": dataclasses.asdict(cfg), "key": cfg.key(),
            "pretrain_heldout_accuracy": evaluate_accuracy(model, heldout).accuracy,
            "pretrain_heldout_open_accuracy": open_answer_accuracy(model, heldout_open),
            "train_seconds": round(time.perf_counter() - start, 1)}
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    torch.set_num_threads(threads)
    return meta


@torch.no_grad()
def open_answer_accuracy(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Share of open-ended samples whose every answer token and EOS is the argmax (teacher-forced)."""
    right = total = 0
    for batch in batches:
        hidden = model.model(**model_inputs(batch)).last_hidden_state
        targets = batch["answer_ids"]
        pos = (batch["answer_pos"][:, None] + torch.arange(targets.shape[1])).clamp(max=hidden.shape[1] - 1)
        pred = model.lm_head(hidden[torch.arange(hidden.shape[0])[:, None], pos]).argmax(-1)
        right += int(((pred == targets) | (targets == -100)).all(1).sum())
        total += targets.shape[0]
    return right / max(total, 1)


def rows_to_dataset(rows: list[dict]):
    """Generated synthetic rows as a schema dataset."""
    import datasets

    from efficientllava.data.schema import FEATURES

    return datasets.Dataset.from_list([{k: r[k] for k in FEATURES} for r in rows], features=FEATURES)


SHIPPED_DIR = Path(__file__).parent / "tiny_weights"  # the default TinyConfig's trained weights, in the package


def shipped_tiny(cfg: TinyConfig | None = None) -> Path | None:
    """The packaged checkpoint when it was trained from exactly `cfg` (default config), else None."""
    cfg = cfg or TinyConfig()
    try:
        meta = json.loads((SHIPPED_DIR / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return SHIPPED_DIR if meta.get("key") == cfg.key() else None


def ensure_tiny(cfg: TinyConfig | None = None) -> Path:
    """Path of the tiny checkpoint for `cfg`: the packaged one when it matches, else trained once and cached."""
    cfg = cfg or TinyConfig()
    return shipped_tiny(cfg) or _cached_tiny(cfg)


def _cached_tiny(cfg: TinyConfig) -> Path:
    """The checkpoint for `cfg` under $EFFICIENTLLAVA_HOME/models, trained there first if missing."""
    final = home_dir() / "models" / f"tiny-{cfg.key()}"
    if (final / META_FILE).exists():
        return final
    with file_lock(  # several trial actors may ask for the model at once
            final.with_suffix(".lock")):
        if (final / META_FILE).exists():
            return final
        logger.info(f"training the built-in tiny LLaVA once (cached at {final}) ...")
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
        try:
            train_tiny(cfg, tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: a killed training leaves no half-written cache
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ship_tiny(cfg: TinyConfig | None = None) -> Path:
    """Copy the trained (cached, else trained now) tiny checkpoint for `cfg` into the package as its shipped weights."""
    source = _cached_tiny(cfg or TinyConfig())
    shutil.rmtree(SHIPPED_DIR, ignore_errors=True)
    shutil.copytree(source, SHIPPED_DIR)
    return SHIPPED_DIR


if __name__ == "__main__":  # python -m efficientllava.models.tiny: regenerate the shipped weights
    print(ship_tiny())
