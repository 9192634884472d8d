"""A generated VQA task (colours, shapes, counts) for the embedded default, in three forms.

Multiple choice (the options are the four words of the question's type), open-ended (the answer
word is the one reference answer: the form the tiny model also learnt) and unlabelled.

Images are small (32 px) renderings of 1-4 shapes, one per quadrant, each with its own colour.
Three question types need different computations (the colour or the kind of a single shape,
the number of shapes), so pruning different layers hurts different questions.
"""

from __future__ import annotations

import hashlib

import datasets
import numpy as np
from PIL import Image, ImageDraw

from efficientllava.data.config import KINDS, MULTIPLE_CHOICE, OPEN_ENDED
from efficientllava.data.schema import FEATURES, convert_kind
from efficientllava.errors import DataError

IMAGE_SIZE = 32
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 40),
}
SHAPES = ("square", "circle", "triangle", "cross")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = ("one", "two", "three", "four")
QTYPES = ("color", "shape", "count")
SPLITS = {"pretrain": 0, "train": 1, "heldout": 2}  # disjoint random streams per split


def question_words() -> list[str]:
    """Every text fragment the task can produce (the tiny model's tokenizer vocabulary comes from it)."""
    texts = [
        "what color is the shape ?",
        "which shape is shown ?",
        "how many shapes are there ?",
        *COLORS,
        *SHAPES,
        *QUADRANTS,
        *COUNTS,
        "nothing",  # the tiny model's per-quadrant training target for an empty quadrant
    ]
    return texts


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], color: tuple) -> None:
    x0, y0, x1, y1 = box
    if kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)
    else:  # cross
        t = max(2, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - t // 2, y0, cx + t // 2, y1), fill=color)
        draw.rectangle((x0, cy - t // 2, x1, cy + t // 2), fill=color)


def _render(objects: list[tuple[int, str, str]], rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (20, 20, 24))
    draw = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    for quadrant, kind, color in objects:
        ox, oy = (quadrant % 2) * half, (quadrant // 2) * half
        size = int(rng.integers(11, 15))
        jx, jy = (int(v) for v in rng.integers(1, half - size, size=2))
        _draw_shape(draw, kind, (ox + jx, oy + jy, ox + jx + size - 1, oy + jy + size - 1), COLORS[color])
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _options(answer: str, pool: tuple[str, ...], rng: np.random.Generator, shuffle: bool) -> tuple[list[str], int]:
    options = list(pool)
    if shuffle:
        options = [options[i] for i in rng.permutation(len(options))]
    return options, options.index(answer)


def _sample(rng: np.random.Generator, shuffle: bool) -> dict:
    qtype = QTYPES[int(rng.integers(0, len(QTYPES)))]
    # Colour and shape questions show one object (anywhere); counting shows one to four.
    n_obj = int(rng.integers(1, 5)) if qtype == "count" else 1
    quadrants = rng.choice(4, n_obj, replace=False)
    colors = rng.choice(len(COLORS), n_obj, replace=False)
    names = list(COLORS)
    objects = [(int(q), SHAPES[int(rng.integers(0, len(SHAPES)))], names[int(c)])
               for q, c in zip(quadrants, colors, strict=True)]
    _, shape, color = objects[0]
    if qtype == "color":
        question, answer, pool = "what color is the shape ?", color, tuple(COLORS)
    elif qtype == "shape":
        question, answer, pool = "which shape is shown ?", shape, SHAPES
    else:
        question, answer, pool = "how many shapes are there ?", COUNTS[n_obj - 1], COUNTS
    options, index = _options(answer, pool, rng, shuffle)
    return {"image": _render(objects, rng), "question": question, "context": "", "options": options,
            "answer": index, "answers": [], "qtype": qtype, "objects": objects}


def generate(n: int, seed: int, split: str, shuffle_options: bool = False) -> list[dict]:
    """Raw samples with their scene layout (`objects`: (quadrant, shape, colour) triples)."""
    if split not in SPLITS:
        raise DataError(f"synthetic data has no split {split!r}; use one of {', '.join(SPLITS)}")
    if n < 1:
        raise DataError(f"synthetic data: n={n} must be at least 1")
    rng = np.random.default_rng([seed, SPLITS[split], 0x5EED])
    rows = [_sample(rng, shuffle_options) for _ in range(n)]
    for i, row in enumerate(rows):
        digest = hashlib.sha1(row["image"].tobytes() + row["question"].encode()).hexdigest()[:8]
        row["id"] = f"synthetic-{split}-{seed}-{i}-{digest}"
    return rows


def make_synthetic(n: int, seed: int, split: str, shuffle_options: bool = False,
                   kind: str = MULTIPLE_CHOICE) -> datasets.Dataset:
    """`n` generated samples of `split` ("pretrain", "train" or "heldout"; disjoint streams) for `seed`.

    Each question type has exactly four answers, listed in a fixed order unless `shuffle_options`
    (then the model must match option texts, which a 1 M-parameter model learns far more slowly).
    `kind` open_ended gives the same rows without options (the answer word is the one reference
    answer), unlabelled the open-ended rows without answers (an image and a question only).
    """
    if kind not in KINDS:
        raise DataError(f"synthetic data has no kind {kind!r}; use one of {', '.join(KINDS)}")
    rows = generate(n, seed, split, shuffle_options)
    ds = datasets.Dataset.from_list([{k: r[k] for k in FEATURES} for r in rows], features=FEATURES)
    if kind == MULTIPLE_CHOICE:
        return ds
    ds = convert_kind(ds, MULTIPLE_CHOICE, OPEN_ENDED, "the synthetic task")
    return convert_kind(ds, OPEN_ENDED, kind, "the synthetic task")
