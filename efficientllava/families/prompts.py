"""Prompt text shared by every model family: the fixed formats, the chat-template message and option letters.

A leaf module (no model, no processor class): families build on it, and `efficientllava.prompting`
re-exports it beside the batch encoders.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from efficientllava.errors import ConfigError

LETTERS = string.ascii_uppercase
# LLaVA-1.5's own ScienceQA evaluation prompt; the answer is the next token after "ASSISTANT:".
LLAVA_15 = "llava-1.5"
# The built-in tiny model's shorter format. The image comes right before the answer: its tokens
# then sit at fixed relative offsets from the answer position, a lookup rotary position
# embeddings make easy for a 1 M-parameter model trained in a few CPU minutes. Real checkpoints
# keep LLaVA-1.5's own order.
COMPACT = "compact"
# The processor's own chat template (`processor.apply_chat_template`): one user turn holding the
# image and the question text, then the template's generation prompt. LLaVA-NeXT, OneVision and
# Qwen2-VL checkpoints ship one.
CHAT = "chat"
PROMPT_FORMATS = (LLAVA_15, COMPACT)  # the fixed text formats; a family adds CHAT where it has a template
_ANSWER_STUB = {LLAVA_15: "ASSISTANT:", COMPACT: "answer :"}
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."


def build_prompt(question: str, options: Sequence[str], context: str, fmt: str, image_token: str) -> str:
    """The prompt text of one sample in fixed format `fmt`; the answer (letter, or text when `options` is empty) follows."""
    if fmt == LLAVA_15:
        return f"USER: {image_token}\n{question_text(question, options, context)} ASSISTANT:"
    if fmt == COMPACT:
        ctx = f"{context} " if context else ""
        opts = "".join(f" {LETTERS[i]} {o}" for i, o in enumerate(options))
        return f"{ctx}{question}{opts} {image_token} answer :"
    raise ConfigError(f"unknown prompt format {fmt!r}; use one of {', '.join(PROMPT_FORMATS)}")


def question_text(question: str, options: Sequence[str], context: str) -> str:
    """LLaVA-1.5's question text: context, question, lettered options and the answer instruction."""
    ctx = f"Context: {context}\n" if context else ""
    if not options:  # open-ended: LLaVA-1.5's short-answer VQA prompt
        return f"{ctx}{question}\n{OPEN_INSTRUCTION}"
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{ctx}{question}\n{opts}\n{MC_INSTRUCTION}"


def chat_prompt(processor: Any, question: str, options: Sequence[str], context: str) -> str:
    """The prompt rendered by the processor's chat template: one user turn (image + question), then the reply stub."""
    if getattr(processor, "chat_template", None) is None:
        raise ConfigError(f"{type(processor).__name__} has no chat template; set prompt_format in the "
                          "checkpoint's efficientllava.json (e.g. llava-1.5 or compact)")
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": question_text(question, options, context)}]}]
    return str(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def join_answer(prompt: str, answer: str) -> str:
    """`prompt` followed by `answer` as the model reads it: after a space, unless the prompt ends in whitespace."""
    return f"{prompt}{'' if prompt[-1:].isspace() else ' '}{answer}"


def answer_stub(fmt: str) -> str:
    """The end of a fixed-format prompt, which the answer follows."""
    if fmt not in _ANSWER_STUB:
        raise ConfigError(f"unknown prompt format {fmt!r}; use one of {', '.join(PROMPT_FORMATS)}")
    return _ANSWER_STUB[fmt]


def letter_ids_after(tokenizer: Any, stub: str, n: int = len(LETTERS)) -> list[int]:
    """Token id of each of the first `n` option letters as it follows the prompt text `stub`."""
    base = tokenizer(stub, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS[:n]:
        full = tokenizer(join_answer(stub, letter), add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ConfigError(f"tokenizer splits the option letter {letter!r} after {stub[-20:]!r} into several "
                              "tokens; multiple-choice scoring needs one token per letter")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ConfigError("tokenizer maps different option letters to the same token")
    return ids


def letter_token_ids(tokenizer: Any, fmt: str, n: int = len(LETTERS)) -> list[int]:
    """Token id of each option letter as it follows fixed format `fmt`'s answer stub (e.g. '▁A' for LLaMA)."""
    return letter_ids_after(tokenizer, answer_stub(fmt), n)
