"""Write the three example data sets of experiments/*-style.yaml, offline, from the synthetic renderer.

    python experiments/data/make_examples.py            # -> experiments/data/generated/

- mmbench-style/mmbench.parquet: multiple choice in MMBench's layout (index, question, hint, one
  column per option A-D, the answer as a letter, category, image as an image feature);
- vizwiz-style/: open-ended, VizWiz's layout: annotations.jsonl (image path relative to the file,
  question, ten annotator answers as {answer, answer_confidence} records, answer_type, answerable)
  and the images in images/;
- unlabelled-images/: a plain folder of PNG images (the experiment supplies the one question).

The questions are the synthetic task's (colours, shapes, counts), so the built-in tiny model,
trained on that task, answers them; the rows are drawn from a seed stream of their own.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import datasets

from efficientllava.data.synthetic import COLORS, COUNTS, SHAPES, generate

HERE = Path(__file__).resolve().parent
LETTERS = "ABCD"
WRONG_POOLS = {"color": tuple(COLORS), "shape": SHAPES, "count": COUNTS}


def _rows(n: int, seed: int, qtypes: tuple[str, ...] = ("color", "shape", "count")) -> list[dict]:
    """`n` synthetic rows of the given question types (a seed stream apart from the search's)."""
    rows: list[dict] = []
    chunk = 0
    while len(rows) < n:
        rows += [r for r in generate(max(n, 64), seed + 1000 + chunk, "heldout") if r["qtype"] in qtypes]
        chunk += 1
    return rows[:n]


def make_mmbench(out: Path, n: int, seed: int) -> Path:
    """A multiple-choice parquet in MMBench's column layout."""
    rows = _rows(n, seed)
    table = {
        "index": list(range(n)),
        "question": [r["question"] for r in rows],
        "hint": ["" for _ in rows],
        **{letter: [r["options"][i] for r in rows] for i, letter in enumerate(LETTERS)},
        "answer": [LETTERS[r["answer"]] for r in rows],
        "category": [r["qtype"] for r in rows],
        "l2-category": ["synthetic" for _ in rows],
        "image": [r["image"] for r in rows],
    }
    features = datasets.Features({
        "index": datasets.Value("int64"), "question": datasets.Value("string"), "hint": datasets.Value("string"),
        **{letter: datasets.Value("string") for letter in LETTERS}, "answer": datasets.Value("string"),
        "category": datasets.Value("string"), "l2-category": datasets.Value("string"), "image": datasets.Image()})
    path = out / "mmbench-style" / "mmbench.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return path


def _annotators(answer: str, qtype: str, rng: random.Random) -> list[dict]:
    """Ten VizWiz-style annotator answers: mostly the right word, some disagreeing, in a shuffled order."""
    n_right = rng.randint(6, 10)
    wrong = [w for w in WRONG_POOLS[qtype] if w != answer]
    answers = [answer] * n_right + [rng.choice(wrong + ["unanswerable"]) for _ in range(10 - n_right)]
    rng.shuffle(answers)
    return [{"answer": a, "answer_confidence": rng.choice(("yes", "yes", "maybe"))} for a in answers]


def make_vizwiz(out: Path, n: int, seed: int) -> Path:
    """An open-ended JSONL index with ten answers per question and an images folder."""
    root = out / "vizwiz-style"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    path = root / "annotations.jsonl"
    with path.open("w") as fh:
        for i, r in enumerate(_rows(n, seed + 1)):
            name = f"images/VizWiz_synthetic_{i:08d}.png"
            r["image"].save(root / name)
            answer = r["options"][r["answer"]]
            record = {"image": name, "question": r["question"], "answers": _annotators(answer, r["qtype"], rng),
                      "answer_type": "number" if r["qtype"] == "count" else "other", "answerable": 1}
            fh.write(json.dumps(record) + "\n")
    return path


def make_unlabelled(out: Path, n: int, seed: int) -> Path:
    """A plain folder of images, each showing one shape (the experiment asks its colour)."""
    root = out / "unlabelled-images"
    root.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(_rows(n, seed + 2, ("color", "shape"))):
        r["image"].save(root / f"photo_{i:05d}.png")
    return root


def main() -> None:
    """Write the three example data sets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "generated", help="output folder")
    parser.add_argument("-n", type=int, default=400, help="samples per data set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for make in (make_mmbench, make_vizwiz, make_unlabelled):
        print(make(args.out, args.n, args.seed))


if __name__ == "__main__":
    main()
