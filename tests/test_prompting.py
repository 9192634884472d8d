"""Prompt formats, option-letter tokens, encoded batches and multiple-choice scoring."""

from __future__ import annotations

import datasets
import pytest
import torch
from PIL import Image

from efficientllava.data.schema import FEATURES
from efficientllava.errors import ConfigError
from efficientllava.prompting import (
    COMPACT,
    LLAVA_15,
    PROMPT_FORMATS,
    build_prompt,
    encode_batches,
    letter_token_ids,
    model_inputs,
)
from efficientllava.scoring.accuracy import answer_logits, evaluate_accuracy, option_logits

QUESTION = "what color is the shape ?"


def _mixed_dataset() -> datasets.Dataset:
    """Five samples with 2 or 4 options and contexts of different lengths (so batches are padded)."""
    rows = []
    specs = [
        (["red", "blue"], 1, ""),
        (["one", "two", "three", "four"], 3, "top left"),
        (["square", "circle"], 0, "top left bottom right nothing"),
        (["red", "green", "blue", "yellow"], 2, ""),
        (["cross", "triangle"], 1, "bottom"),
    ]
    for i, (options, answer, context) in enumerate(specs):
        rows.append(
            {
                "id": f"mixed-{i}",
                "image": Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)),
                "question": QUESTION,
                "context": context,
                "options": options,
                "answer": answer,
                "answers": [],
                "qtype": "color",
            }
        )
    return datasets.Dataset.from_list(rows, features=FEATURES)


def test_llava15_prompt():
    with_ctx = build_prompt(QUESTION, ["red", "blue", "green"], "a hint", LLAVA_15, "<image>")
    assert with_ctx == (
        "USER: <image>\nContext: a hint\nwhat color is the shape ?\nA. red\nB. blue\nC. green\n"
        "Answer with the option's letter from the given choices directly. ASSISTANT:"
    )
    without = build_prompt(QUESTION, ["red", "blue"], "", LLAVA_15, "<image>")
    assert without.startswith(f"USER: <image>\n{QUESTION}\nA. red\nB. blue\n")
    assert "Context" not in without and without.endswith("ASSISTANT:")
    assert build_prompt("q", ["x"], "", LLAVA_15, "<img>").startswith("USER: <img>\n")


def test_compact_prompt():
    assert (
        build_prompt(QUESTION, ["red", "blue"], "", COMPACT, "<image>")
        == f"{QUESTION} A red B blue <image> answer :"
    )
    assert build_prompt("q ?", ["x", "y", "z"], "ctx", COMPACT, "<im>") == "ctx q ? A x B y C z <im> answer :"


def test_unknown_format(small_model):
    assert set(PROMPT_FORMATS) == {LLAVA_15, COMPACT}
    with pytest.raises(ConfigError, match="unknown prompt format 'vicuna'"):
        build_prompt(QUESTION, ["a", "b"], "", "vicuna", "<image>")
    with pytest.raises(ConfigError, match="unknown prompt format 'vicuna'"):
        letter_token_ids(small_model[1].tokenizer, "vicuna", 4)


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_letter_token_ids_tiny_tokenizer(small_model, fmt):
    tokenizer = small_model[1].tokenizer
    ids = letter_token_ids(tokenizer, fmt)
    assert len(ids) == 26 and len(set(ids)) == 26
    assert ids[:4] == tokenizer.convert_tokens_to_ids(list("ABCD"))
    assert letter_token_ids(tokenizer, fmt, 3) == ids[:3]


class _CharTokenizer:
    """One token per character (spaces included): letters after the stub become two tokens."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class _SameTokenizer:
    """Every word maps to token 7, so all letters collide."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [7] * len(text.split())}


def test_letter_token_ids_rejects_unusable_tokenizers():
    with pytest.raises(ConfigError, match="several tokens"):
        letter_token_ids(_CharTokenizer(), LLAVA_15, 2)
    with pytest.raises(ConfigError, match="same token"):
        letter_token_ids(_SameTokenizer(), COMPACT, 2)


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_encode_batches_layout(small_model, fmt):
    model, processor = small_model
    tokenizer = processor.tokenizer
    data = _mixed_dataset()
    batches = encode_batches(processor, data, 3, fmt)
    assert [len(b["answers"]) for b in batches] == [3, 2]
    letters = tokenizer.convert_tokens_to_ids(list("ABCD"))
    stub_end = tokenizer.convert_tokens_to_ids(":")  # both formats end in ":" ("answer :" / "ASSISTANT:")
    image_id = model.config.image_token_index
    row = 0
    for batch in batches:
        assert set(batch) >= {
            "input_ids",
            "attention_mask",
            "pixel_values",
            "answer_pos",
            "option_ids",
            "labels",
            "answers",
        }
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = mask.sum(1)
        assert lengths.min() < lengths.max()  # the contexts differ: there is padding to check
        for i in range(len(ids)):
            n = int(lengths[i])
            # Right padding: real tokens first, then pad tokens only.
            assert mask[i, :n].all() and not mask[i, n:].any()
            assert (ids[i, n:] == tokenizer.pad_token_id).all()
            assert int(batch["answer_pos"][i]) == n - 1 and int(ids[i, n - 1]) == stub_end
            # One image token per 16 px patch of the 32 px image.
            assert int((ids[i] == image_id).sum()) == 4
            options, answer = data[row]["options"], data[row]["answer"]
            expected = letters[: len(options)] + [-1] * (4 - len(options))
            assert batch["option_ids"][i].tolist() == expected
            assert int(batch["answers"][i]) == answer
            assert int(batch["labels"][i]) == expected[answer] == batch["option_ids"][i, answer]
            row += 1
        assert batch["pixel_values"].shape == (len(ids), 3, 32, 32)
        assert batch["pixel_values"].dtype == torch.float32
    assert row == len(data)


def test_encode_batches_dtype(small_model):
    batch = encode_batches(small_model[1], _mixed_dataset(), 8, COMPACT, dtype=torch.bfloat16)[0]
    assert batch["pixel_values"].dtype == torch.bfloat16
    assert batch["input_ids"].dtype == torch.long and batch["option_ids"].dtype == torch.long
    assert model_inputs(batch).keys() == {"input_ids", "attention_mask", "pixel_values"}


def test_option_logits_mask_missing_options(small_model):
    model, processor = small_model
    batch = encode_batches(processor, _mixed_dataset(), 8, COMPACT)[0]
    with torch.no_grad():
        picked = option_logits(model, batch)
        full = answer_logits(model, batch)
    assert picked.shape == (5, 4)
    present = batch["option_ids"] >= 0
    assert torch.isneginf(picked[~present]).all() and int((~present).sum()) == 3 * 2
    assert torch.isfinite(picked[present]).all()
    assert torch.equal(picked[present], full.gather(1, batch["option_ids"].clamp(min=0))[present])
    # answer_logits is the full forward's logits at each answer position.
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    assert torch.allclose(full, logits[torch.arange(5), batch["answer_pos"]], atol=1e-5)


def test_padding_does_not_change_predictions(small_model, small_batches):
    model, processor = small_model
    data = _mixed_dataset()
    batched = encode_batches(processor, data, 8, COMPACT)
    single = encode_batches(processor, data, 1, COMPACT)
    with torch.no_grad():
        together = option_logits(model, batched[0])
        alone = torch.cat([option_logits(model, b) for b in single])
    assert torch.allclose(together, alone, atol=1e-5)
    a, b = evaluate_accuracy(model, batched), evaluate_accuracy(model, single)
    assert a.n == b.n == 5 and a.correct == b.correct and a.accuracy == b.accuracy
    assert a.accuracy == sum(a.correct) / 5
    expected = tuple(int(i) == ans for i, ans in zip(alone.argmax(1), data["answer"], strict=True))
    assert a.correct == expected
    # The same holds on the synthetic task's batches, each sample cut out without its padding.
    ones = [_unpadded(b, i) for b in small_batches for i in range(len(b["answers"]))]
    assert evaluate_accuracy(model, small_batches).correct == evaluate_accuracy(model, ones).correct


def _unpadded(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample `i` of `batch` as a batch of one, its sequence cut at its last real token."""
    n = int(batch["attention_mask"][i].sum())
    one = {k: v[i : i + 1] for k, v in batch.items()}
    one["input_ids"], one["attention_mask"] = one["input_ids"][:, :n], one["attention_mask"][:, :n]
    return one


def test_evaluate_accuracy_empty(small_model):
    result = evaluate_accuracy(small_model[0], [])
    assert (result.n, result.accuracy, result.correct) == (0, 0.0, ())
