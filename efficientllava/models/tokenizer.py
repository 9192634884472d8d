"""An offline word-level tokenizer for the built-in tiny model (no hub download)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from efficientllava.prompting import LETTERS

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


def build_word_tokenizer(texts: Iterable[str], extra_special: Sequence[str] = (),
                         image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose vocabulary is every word and symbol of `texts` plus the option letters.

    `extra_special` adds special tokens (e.g. a chat template's turn markers) after the built-in
    ones; `image_token` names the image placeholder a processor reads from the tokenizer.
    """
    pre = pre_tokenizers.Whitespace()
    words: dict[str, None] = {}
    for text in [*texts, " ".join(LETTERS)]:
        for word, _ in pre.pre_tokenize_str(text):
            words.setdefault(word)
    special = list(dict.fromkeys([*SPECIAL, image_token, *extra_special]))
    vocab = {tok: i for i, tok in enumerate([*special, *sorted(w for w in words if w not in special)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>", extra_special_tokens={"image_token": image_token})
    tok.add_special_tokens({"additional_special_tokens": special[len(SPECIAL) - 1:]})
    return tok
