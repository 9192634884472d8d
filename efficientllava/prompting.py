"""Prompt formats and model-ready batches for multiple-choice questions, scored by option-letter logits."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import datasets
import torch

from efficientllava.errors import ConfigError

LETTERS = string.ascii_uppercase
# LLaVA-1.5's own ScienceQA evaluation prompt; the answer is the next token after "ASSISTANT:".
LLAVA_15 = "llava-1.5"
# The built-in tiny model's shorter format. The image comes right before the answer: its tokens
# then sit at fixed relative offsets from the answer position, a lookup rotary position
# embeddings make easy for a 1 M-parameter model trained in a few CPU minutes. Real checkpoints
# keep LLaVA-1.5's own order.
COMPACT = "compact"
PROMPT_FORMATS = (LLAVA_15, COMPACT)
_ANSWER_STUB = {LLAVA_15: "ASSISTANT:", COMPACT: "answer :"}


def build_prompt(question: str, options: Sequence[str], context: str, fmt: str, image_token: str) -> str:
    """The prompt text of one sample in format `fmt`; the answer (letter, or text when `options` is empty) follows."""
    if fmt == LLAVA_15:
        ctx = f"Context: {context}\n" if context else ""
        if not options:  # open-ended: LLaVA-1.5's short-answer VQA prompt
            return f"USER: {image_token}\n{ctx}{question}\nAnswer the question using a single word or phrase. ASSISTANT:"
        opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        return (f"USER: {image_token}\n{ctx}{question}\n{opts}\n"
                "Answer with the option's letter from the given choices directly. ASSISTANT:")
    if fmt == COMPACT:
        ctx = f"{context} " if context else ""
        opts = "".join(f" {LETTERS[i]} {o}" for i, o in enumerate(options))
        return f"{ctx}{question}{opts} {image_token} answer :"
    raise ConfigError(f"unknown prompt format {fmt!r}; use one of {', '.join(PROMPT_FORMATS)}")


def letter_token_ids(tokenizer: Any, fmt: str, n: int = len(LETTERS)) -> list[int]:
    """Token id of each option letter as it follows the answer stub (e.g. '▁A' for LLaMA)."""
    if fmt not in _ANSWER_STUB:
        raise ConfigError(f"unknown prompt format {fmt!r}; use one of {', '.join(PROMPT_FORMATS)}")
    stub = _ANSWER_STUB[fmt]
    base = tokenizer(stub, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS[:n]:
        full = tokenizer(f"{stub} {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ConfigError(f"tokenizer splits the option letter {letter!r} after {stub!r} into several tokens; "
                              "multiple-choice scoring needs one token per letter")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ConfigError("tokenizer maps different option letters to the same token")
    return ids


def encode_batches(processor: Any, dataset: datasets.Dataset, batch_size: int, fmt: str,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenise and process `dataset` once into model-ready batches on `device`.

    Each batch holds input_ids, attention_mask, pixel_values (the model's forward inputs) and
    answer_pos (last real token), option_ids (letter ids, -1 beyond a sample's options) and
    labels (the correct letter's token id). Right padding keeps position ids as in unbatched use.
    """
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    max_opts = max(len(o) for o in dataset["options"])
    letters = letter_token_ids(tokenizer, fmt, max_opts)
    batches = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        prompts = [build_prompt(q, o, c, fmt, processor.image_token)
                   for q, o, c in zip(rows["question"], rows["options"], rows["context"], strict=True)]
        images = [im.convert("RGB") for im in rows["image"]]
        enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        mask = enc["attention_mask"]
        option_ids = torch.full((len(prompts), max_opts), -1, dtype=torch.long)
        for i, opts in enumerate(rows["options"]):
            option_ids[i, : len(opts)] = torch.tensor(letters[: len(opts)])
        answers = torch.tensor(rows["answer"], dtype=torch.long)
        batch = {
            "input_ids": enc["input_ids"],
            "attention_mask": mask,
            "pixel_values": enc["pixel_values"].to(dtype) if dtype is not None else enc["pixel_values"],
            "answer_pos": mask.sum(1) - 1,
            "option_ids": option_ids,
            "labels": option_ids.gather(1, answers[:, None]).squeeze(1),
            "answers": answers,
        }
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def encode_answer_batches(processor: Any, images: Sequence[Any], prompts: Sequence[str], answers: Sequence[str],
                          batch_size: int, device: torch.device | str = "cpu",
                          dtype: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """Teacher-forced batches of prompt + free-text answer: the answer tokens and EOS are the targets.

    Each batch holds the model's forward inputs for `prompt + " " + answer` (right padded),
    answer_pos (the prompt's last token: position answer_pos + j predicts answer_ids[:, j]) and
    answer_ids [batch, max answer tokens + 1]: the answer's tokens then EOS, -100 beyond them.
    """
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; open-ended answers need one to mark their end")
    batches = []
    for start in range(0, len(prompts), batch_size):
        imgs = [im.convert("RGB") for im in images[start : start + batch_size]]
        texts = list(prompts[start : start + batch_size])
        full_texts = [f"{p} {a}" for p, a in zip(texts, answers[start : start + batch_size], strict=True)]
        enc_prompt = processor(images=imgs, text=texts, return_tensors="pt", padding=True)
        enc_full = processor(images=imgs, text=full_texts, return_tensors="pt", padding=True)
        rows, targets, starts = [], [], []
        for i in range(len(texts)):
            prompt_ids = enc_prompt["input_ids"][i, : int(enc_prompt["attention_mask"][i].sum())].tolist()
            full_ids = enc_full["input_ids"][i, : int(enc_full["attention_mask"][i].sum())].tolist()
            if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
                raise ConfigError(f"the tokenizer does not split {full_texts[i]!r} at the end of its prompt; "
                                  "open-ended scoring needs the prompt's tokens as a prefix of prompt + answer")
            rows.append(full_ids)
            targets.append(full_ids[len(prompt_ids):] + [eos])
            starts.append(len(prompt_ids) - 1)
        width, answer_width = max(len(r) for r in rows), max(len(t) for t in targets)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        answer_ids = torch.full((len(rows), answer_width), -100, dtype=torch.long)
        for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            answer_ids[i, : len(t)] = torch.tensor(t)
        pixels = enc_full["pixel_values"]
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "pixel_values": pixels.to(dtype) if dtype is not None else pixels,
                 "answer_pos": torch.tensor(starts), "answer_ids": answer_ids}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subset of a batch that is passed to the model's forward."""
    return {k: batch[k] for k in MODEL_INPUTS}
