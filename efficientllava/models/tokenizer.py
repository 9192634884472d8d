"""An offline word-level tokenizer for the built-in tiny model (no hub download)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from efficientllava.prompting import LETTERS

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose vocabulary is every word and symbol of `texts` plus the option letters."""
    pre = pre_tokenizers.Whitespace()
    words: dict[str, None] = {}
    for text in [*texts, " ".join(LETTERS)]:
        for word, _ in pre.pre_tokenize_str(text):
            words.setdefault(word)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok
