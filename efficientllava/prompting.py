"""Model-ready batches for multiple-choice and open-ended questions, built through the model's family.

The prompt text itself (formats, option letters) lives in `efficientllava.families.prompts` and is
re-exported here. A batch is the model's forward inputs (whatever its family's processor makes:
pixel_values, image_sizes, image_grid_thw, ...) plus our own keys (`families.OWN_KEYS`);
`model_inputs(batch)` is the batch minus those.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import torch

from efficientllava.errors import ConfigError
from efficientllava.families import ModelFamily, family_of_processor, model_inputs
from efficientllava.families.prompts import (
    CHAT,
    COMPACT,
    LETTERS,
    LLAVA_15,
    PROMPT_FORMATS,
    build_prompt,
    join_answer,
    letter_token_ids,
)

__all__ = ["CHAT", "COMPACT", "LETTERS", "LLAVA_15", "PROMPT_FORMATS", "build_prompt", "encode_answer_batches",
           "encode_batches", "join_answer", "letter_token_ids", "model_inputs"]


def _to(batch: dict[str, torch.Tensor], device: torch.device | str,
        dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The batch on `device`, its floating-point inputs (pixel values) in `dtype`."""
    return {k: (v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device))
            for k, v in batch.items()}


def encode_batches(processor: Any, dataset: datasets.Dataset, batch_size: int, fmt: str,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None, *,
                   family: ModelFamily | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenise and process a multiple-choice `dataset` once into model-ready batches on `device`.

    Each batch holds the model's forward inputs (input_ids, attention_mask, pixel_values and what
    else the family's processor makes) and answer_pos (last real token), option_ids (letter ids,
    -1 beyond a sample's options), labels (the correct letter's token id) and answers (its index);
    a dataset of unlabelled questions (answer -1) gets neither labels nor answers.
    Right padding keeps position ids as in unbatched use. `family` defaults to the processor's.
    """
    family = family or family_of_processor(processor)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    max_opts = max(len(o) for o in dataset["options"])
    letters = family.letter_token_ids(processor, fmt, max_opts)
    batches = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        prompts = [family.prompt(processor, fmt, q, o, c)
                   for q, o, c in zip(rows["question"], rows["options"], rows["context"], strict=True)]
        batch = family.encode(processor, [im.convert("RGB") for im in rows["image"]], prompts)
        option_ids = torch.full((len(prompts), max_opts), -1, dtype=torch.long)
        for i, opts in enumerate(rows["options"]):
            option_ids[i, : len(opts)] = torch.tensor(letters[: len(opts)])
        answers = torch.tensor(rows["answer"], dtype=torch.long)
        batch.update(answer_pos=batch["attention_mask"].sum(1) - 1, option_ids=option_ids)
        if bool((answers >= 0).all()):  # unlabelled questions (answer -1) get no labels / answers
            batch.update(labels=option_ids.gather(1, answers[:, None]).squeeze(1), answers=answers)
        batches.append(_to(batch, device, dtype))
    return batches


def encode_answer_batches(processor: Any, images: Sequence[Any], prompts: Sequence[str], answers: Sequence[str],
                          batch_size: int, device: torch.device | str = "cpu",
                          dtype: torch.dtype | None = None, *,
                          family: ModelFamily | None = None) -> list[dict[str, torch.Tensor]]:
    """Teacher-forced batches of prompt + free-text answer: the answer tokens and EOS are the targets.

    Each batch holds the model's forward inputs for `join_answer(prompt, answer)` (right padded),
    answer_pos (the prompt's last token: position answer_pos + j predicts answer_ids[:, j]) and
    answer_ids [batch, max answer tokens + 1]: the answer's tokens then EOS, -100 beyond them.
    """
    family = family or family_of_processor(processor)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; open-ended answers need one to mark their end")
    batches = []
    for start in range(0, len(prompts), batch_size):
        imgs = [im.convert("RGB") for im in images[start : start + batch_size]]
        texts = list(prompts[start : start + batch_size])
        chunk = list(answers[start : start + batch_size])
        # An empty answer (a model that answered with EOS at once) is the prompt itself; its target is EOS.
        full_texts = [join_answer(p, a) if a else p for p, a in zip(texts, chunk, strict=True)]
        enc_prompt = family.encode(processor, imgs, texts)
        batch = family.encode(processor, imgs, full_texts)
        targets, starts = [], []
        for i in range(len(texts)):
            prompt_ids = enc_prompt["input_ids"][i, : int(enc_prompt["attention_mask"][i].sum())].tolist()
            full_ids = batch["input_ids"][i, : int(batch["attention_mask"][i].sum())].tolist()
            if full_ids[: len(prompt_ids)] != prompt_ids or (chunk[i] and len(full_ids) == len(prompt_ids)):
                raise ConfigError(f"the tokenizer does not split {full_texts[i]!r} at the end of its prompt; "
                                  "open-ended scoring needs the prompt's tokens as a prefix of prompt + answer")
            targets.append(full_ids[len(prompt_ids):] + [eos])
            starts.append(len(prompt_ids) - 1)
        answer_ids = torch.full((len(texts), max(len(t) for t in targets)), -100, dtype=torch.long)
        for i, t in enumerate(targets):
            answer_ids[i, : len(t)] = torch.tensor(t)
        batch.update(answer_pos=torch.tensor(starts), answer_ids=answer_ids)
        batches.append(_to(batch, device, dtype))
    return batches
