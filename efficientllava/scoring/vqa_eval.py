"""Open-ended answers scored as the VQAv2 evaluation does: its normalisation, exact match and VQA accuracy.

Normalisation (VQAv2's official evaluation rules): newlines and tabs become spaces; the punctuation
marks ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! are deleted where they touch a space (or anywhere,
when the text has a digit,digit comma) and become spaces elsewhere; periods not followed by a
digit are deleted; the text is lower-cased; number words zero..ten (and "none") become digits;
the articles a, an, the are dropped; apostrophe-less contractions get their apostrophes back
("dont" -> "don't"). References are normalised with the same rules as predictions, so data sets
whose references were never normalised (most user data) score as VQAv2's already-clean ones do.

VQA accuracy of a prediction with n > 1 references: the mean over the n leave-one-out subsets of
min(#matching references in the subset / 3, 1) (VQAv2 / VizWiz, n = 10: 3 matching annotators
give full credit). With one reference it is exact match.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its look-behind is malformed, so in effect it deletes every
# period that is not followed by a digit. This is that effect.
_PERIOD = re.compile(r"\.(?!\d)")
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# The contractions VQAv2's evaluation restores; each is matched with any of its apostrophes missing.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't "
    "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
_KEEP = frozenset({"lets", "shes"})  # English words the official table leaves alone


def _contractions() -> dict[str, str]:
    """Every spelling of each contraction with one or more apostrophes missing -> the full spelling."""
    table: dict[str, str] = {}
    for full in _CONTRACTED:
        marks = [i for i, ch in enumerate(full) if ch == "'"]
        for k in range(1, len(marks) + 1):
            for drop in itertools.combinations(marks, k):
                variant = "".join(ch for i, ch in enumerate(full) if i not in drop)
                if variant not in _KEEP:
                    table.setdefault(variant, full)
    return table


CONTRACTIONS = _contractions()


def normalize_answer(text: str) -> str:
    """An answer as VQAv2's evaluation compares it (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The official rule looks at the text before any mark was replaced, as here.
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD.sub("", out)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy: min(#references equal to the prediction / 3, 1), averaged over leave-one-out subsets."""
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    # Leaving out reference i keeps matches - [refs[i] == pred] of the others.
    return sum(min(1.0, (matches - (r == pred)) / 3) for r in refs) / len(refs)


@dataclass(frozen=True)
class AnswerScores:
    """Per-sample and mean exact match and VQA accuracy of generated answers against references."""

    exact_match: float
    vqa_accuracy: float
    n: int
    per_sample_exact: tuple[float, ...]
    per_sample_vqa: tuple[float, ...]


def score_answers(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> AnswerScores:
    """Exact match and VQA accuracy of each prediction against its references (one list per sample)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    exact = tuple(exact_match(p, r) for p, r in zip(predictions, references, strict=True))
    vqa = tuple(vqa_accuracy(p, r) for p, r in zip(predictions, references, strict=True))
    n = len(exact)
    return AnswerScores(sum(exact) / max(n, 1), sum(vqa) / max(n, 1), n, exact, vqa)


def agreement(predictions: Sequence[str], dense_predictions: Sequence[str]) -> float:
    """Share of samples whose normalised answer equals the dense model's (the unlabelled tasks' held-out figure)."""
    return score_answers(predictions, [[d] for d in dense_predictions]).exact_match
