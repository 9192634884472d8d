"""Any VQA data set (data.dataset: vqa): each source form in each task kind, column mappings, option and
answer layouts, kind conversion, the data fingerprint, example data, and one-line errors for bad inputs."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import yaml
from PIL import Image
from vqa_sources import LETTERS, N, make_source
from vqa_sources import record as _record
from vqa_sources import save_images as _images
from vqa_sources import truth as _truth
from vqa_sources import write_table as _write_table

from efficientllava.config import config_from_dict, config_to_dict, load_config
from efficientllava.data import ColumnMap, DataConfig, load_task, make_synthetic
from efficientllava.data.schema import FEATURES
from efficientllava.data.vqa import split_lettered
from efficientllava.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep the `datasets` cache of each test inside its tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _check(task, rows: list[dict], kind: str) -> None:
    """Every drawn row carries its ground truth in the schema's form for `kind`."""
    truth = {r["id"]: r for r in rows}
    assert task.fewshot.features == FEATURES and task.heldout.features == FEATURES
    for ds in (task.fewshot, task.heldout):
        for s in ds:
            key = s["id"].removesuffix(".png")
            r = truth[key]
            assert s["question"] == (r["question"] if kind != "folder" else "what color is the shape ?")
            assert s["image"].convert("RGB").tobytes() == r["image"].tobytes()
            if kind == "mc":
                assert (s["options"], s["answer"], s["answers"]) == (r["options"], r["answer"], [])
            elif kind == "open1":
                assert (s["options"], s["answer"], s["answers"]) == ([], -1, [r["word"]])
            elif kind == "open10":
                assert (s["options"], s["answer"], s["answers"]) == ([], -1, r["refs"])
            else:
                assert (s["options"], s["answer"], s["answers"]) == ([], -1, [])
    assert not set(task.fewshot["id"]) & set(task.heldout["id"])


KIND_NAMES = {"mc": "multiple_choice", "open1": "open_ended", "open10": "open_ended", "unlabelled": "unlabelled",
              "folder": "unlabelled"}
CASES = [(form, kind) for form in ("hub-dir", "parquet", "jsonl", "csv")
         for kind in ("mc", "open1", "open10", "unlabelled")] + [("folder", "folder")]


@pytest.mark.parametrize(("form", "kind"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_each_source_form_in_each_kind(tmp_path, form, kind):
    source, rows = make_source(tmp_path, form, kind)
    prompt = "what color is the shape ?" if kind == "folder" else None
    task = load_task(DataConfig(dataset="vqa", source=source, n_shots=5, heldout_size=None, prompt=prompt))
    assert task.kind == KIND_NAMES[kind] and task.name == "vqa" and task.source == source
    # The Hub layout has splits (few-shot from train, held-out = all of test); the others are one pool.
    assert (len(task.fewshot), len(task.heldout)) == ((5, 4) if form == "hub-dir" else (5, N - 5))
    _check(task, rows, kind)
    again = load_task(DataConfig(dataset="vqa", source=source, n_shots=5, heldout_size=None, prompt=prompt))
    assert list(again.fewshot["id"]) == list(task.fewshot["id"]) and again.fingerprint == task.fingerprint


def test_mmbench_layout_with_fewer_options_and_letters(tmp_path):
    rows = _truth()
    records = []
    for r in rows:
        keep = 2 + int(r["id"].split("-")[1]) % 3  # 2-4 options: trailing option columns left empty
        opts = r["options"][:keep] if r["answer"] < keep else r["options"][r["answer"] - keep + 1: r["answer"] + 1]
        records.append({"index": r["id"], "question": r["question"], "hint": "a hint",
                        **{k: (opts[i] if i < len(opts) else None) for i, k in enumerate(LETTERS)},
                        "answer": f"({LETTERS[opts.index(r['word'])]})", "category": r["qtype"], "img": r["image"]})
    path = _write_table(tmp_path / "mmbench.parquet", records)
    task = load_task(DataConfig(dataset="vqa", source=str(path), n_shots=4, heldout_size=None,
                                columns=ColumnMap(image="img")))
    assert task.kind == "multiple_choice"
    for s in [*task.fewshot, *task.heldout]:
        assert s["options"][s["answer"]] == next(r["word"] for r in rows if r["id"] == s["id"])
        assert 2 <= len(s["options"]) <= 4 and s["context"] == "a hint" and s["qtype"] in ("color", "shape", "count")


def test_column_mapping_reads_own_names(tmp_path):
    rows = _truth()
    names = _images(rows, tmp_path)
    recs = [{"qid": r["id"], "picture": n, "prompt_text": r["question"], "choices_list": r["options"],
             "gold": r["answer"], "notes": "ctx"} for r, n in zip(rows, names, strict=True)]
    path = _write_table(tmp_path / "mine.jsonl", recs)
    cols = ColumnMap(image="picture", question="prompt_text", options=("choices_list",), answer="gold",
                     context="notes", id="qid")
    task = load_task(DataConfig(dataset="vqa", source=str(path), n_shots=3, heldout_size=None, columns=cols))
    assert task.kind == "multiple_choice" and set(task.fewshot["context"]) == {"ctx"}
    _check(task, rows, "mc")


@pytest.mark.parametrize(
    ("text", "question", "options"),
    [
        ("what color?\nA. red\nB. blue", "what color?", ["red", "blue"]),
        ("what color?\nOptions:\n(A) red\n(B) blue\n(C) green", "what color?", ["red", "blue", "green"]),
        ("what color? A) red\nB) blue", "what color? A) red\nB) blue", []),  # A must start a line
        ("what color? (A) red (B) blue", "what color?", ["red", "blue"]),
        ("pick one:\nA: dog\nB: cat\nAnswer with the letter.", "pick one:\nAnswer with the letter.", ["dog", "cat"]),
        ("Is (A) the answer?", "Is (A) the answer?", []),
        ("no options here", "no options here", []),
    ],
)
def test_lettered_options_in_text(text, question, options):
    assert split_lettered(text) == (question, options)


@pytest.mark.parametrize("answer", [2, "2", "C", "(C)", "C.", "Green", " green "])
def test_answer_as_index_letter_or_text(tmp_path, answer):
    rec = {"image": "x.png", "question": "q", "options": ["red", "blue", "green"], "answer": answer}
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    path = _write_table(tmp_path / "one.jsonl", [rec, {**rec, "answer": 0}])
    task = load_task(DataConfig(dataset="vqa", source=str(path), n_shots=1, seed=0))
    both = [*task.fewshot, *task.heldout]
    assert sorted(s["answer"] for s in both) == [0, 2]


def test_images_as_bytes_base64_and_data_uris(tmp_path):
    rows = _truth(4)
    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()
    b64 = [base64.b64encode(png(r["image"])).decode() for r in rows]
    recs = [{"id": r["id"], "image": b64[0] if i == 0 else f"data:image/png;base64,{b64[i]}", "question": "q",
             "answer": "x"} for i, r in enumerate(rows)]
    tsv = tmp_path / "mm.tsv"
    datasets.Dataset.from_list(recs).to_csv(str(tsv), sep="\t", index=False)
    raw = _write_table(tmp_path / "bytes.parquet", [{"id": r["id"], "image": png(r["image"]), "question": "q",
                                                     "answer": "x"} for r in rows])
    for path in (tsv, raw):
        task = load_task(DataConfig(dataset="vqa", source=str(path), n_shots=2, heldout_size=None))
        for s in [*task.fewshot, *task.heldout]:
            want = next(r for r in rows if r["id"] == s["id"])["image"]
            assert s["image"].convert("RGB").tobytes() == want.tobytes()


def test_kind_conversion(tmp_path):
    source, rows = make_source(tmp_path, "parquet", "mc")
    as_open = load_task(DataConfig(dataset="vqa", source=source, n_shots=4, kind="open_ended", heldout_size=None))
    _check(as_open, rows, "open1")
    plain = load_task(DataConfig(dataset="vqa", source=source, n_shots=4, kind="unlabelled", heldout_size=None))
    assert plain.kind == "unlabelled" and plain.has_options and set(plain.fewshot["answer"]) == {-1}
    source_open, _ = make_source(tmp_path / "o", "jsonl", "open10")
    with pytest.raises(DataError, match="data.kind=multiple_choice but .* is open-ended"):
        load_task(DataConfig(dataset="vqa", source=source_open, n_shots=4, kind="multiple_choice"))


def test_synthetic_forms_share_rows():
    mc, op, un = (load_task(DataConfig(n_shots=8, heldout_size=16, seed=2, kind=k))
                  for k in (None, "open_ended", "unlabelled"))
    assert (mc.kind, op.kind, un.kind) == ("multiple_choice", "open_ended", "unlabelled")
    assert list(mc.heldout["id"]) == list(op.heldout["id"]) == list(un.heldout["id"])
    assert [[o[a]] for o, a in zip(mc.heldout["options"], mc.heldout["answer"], strict=True)] == op.heldout["answers"]
    assert set(map(len, op.heldout["options"])) == {0} and set(map(len, un.heldout["answers"])) == {0}
    assert not un.has_options and len({mc.fingerprint, op.fingerprint, un.fingerprint}) == 3
    assert make_synthetic(4, 0, "train", kind="open_ended")["answers"][0] in (["red"], ["green"], ["blue"],
                                                                             ["yellow"], ["square"], ["circle"],
                                                                             ["triangle"], ["cross"], ["one"],
                                                                             ["two"], ["three"], ["four"])


def test_fingerprint_covers_source_mapping_kind_shots_seed(tmp_path):
    source, _ = make_source(tmp_path, "jsonl", "open1")
    base = DataConfig(dataset="vqa", source=source, n_shots=4, heldout_size=None)
    prints = {load_task(base).fingerprint}
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "index.jsonl").write_text(Path(source).read_text())
    (copy / "images").symlink_to(Path(source).parent / "images")
    for cfg in (DataConfig(**{**base.__dict__, "source": str(copy / "index.jsonl")}),
                DataConfig(**{**base.__dict__, "columns": ColumnMap(question="question")}),  # same columns, other mapping
                DataConfig(**{**base.__dict__, "kind": "unlabelled"}),
                DataConfig(**{**base.__dict__, "n_shots": 5}),
                DataConfig(**{**base.__dict__, "seed": 1})):
        prints.add(load_task(cfg).fingerprint)
    assert len(prints) == 6
    assert load_task(DataConfig(**{**base.__dict__, "heldout_size": 3})).fingerprint == load_task(base).fingerprint
    # Editing a few-shot row's content changes it too.
    lines = Path(source).read_text().splitlines()
    lines = [line.replace('"question": "', '"question": "now ') for line in lines]
    Path(source).write_text("\n".join(lines) + "\n")
    assert load_task(base).fingerprint not in prints


def test_hub_dataset_offline_gives_predownload_hint(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_task(DataConfig(dataset="vqa", source="no-such-owner-1f3a/no-such-vqa", n_shots=2))
    msg = str(err.value)
    assert "\n" not in msg and "no-such-owner-1f3a/no-such-vqa" in msg
    assert "hf download --repo-type dataset no-such-owner-1f3a/no-such-vqa --local-dir DIR" in msg
    assert "data.source: DIR" in msg


def test_hub_dataset_splits(tmp_path, monkeypatch):
    root, _ = make_source(tmp_path, "hub-dir", "open1")
    files = {s: str(next((Path(root) / "data").glob(f"{s}-*.parquet"))) for s in ("train", "test")}
    local = datasets.load_dataset("parquet", data_files=files)
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: calls.append((path, a)) or local)
    task = load_task(DataConfig(dataset="vqa", source="owner/vqa-set", subset="en", n_shots=3, heldout_size=None))
    assert (len(task.fewshot), len(task.heldout), task.kind) == (3, 4, "open_ended")
    assert calls[0] == ("owner/vqa-set", ("en",))
    with pytest.raises(DataError, match=r"owner/vqa-set: unknown split 'dev'; available splits: train, test"):
        load_task(DataConfig(dataset="vqa", source="owner/vqa-set", n_shots=3, heldout_split="dev"))


def test_unreachable_url_names_the_row(tmp_path):
    recs = [{"id": f"u{i}", "image": "http://127.0.0.1:9/photo.png", "question": "q", "answer": "x"} for i in range(3)]
    path = _write_table(tmp_path / "urls.jsonl", recs)
    with pytest.raises(DataError, match=r"row \d \(id u\d\): cannot fetch image http://127.0.0.1:9/photo.png") as e:
        load_task(DataConfig(dataset="vqa", source=str(path), n_shots=1))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


# ---------------------------------------------------------------- bad inputs: one line naming file, row or column


def _jsonl(tmp_path: Path, records: list[dict], name: str = "bad.jsonl") -> Path:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    return _write_table(tmp_path / name, records)


def _error(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as err:
        load_task(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _vqa(path: Path, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "vqa", "source": str(path), "n_shots": 2, "heldout_size": None, **kw})


GOOD = {"image": "ok.png", "question": "q", "options": ["a", "b"], "answer": 1}


def test_bad_mapped_column(tmp_path):
    path = _jsonl(tmp_path, [GOOD] * 4)
    msg = _error(_vqa(path, columns=ColumnMap(answer="gold")))
    assert msg == (f"{path}: data.columns.answer='gold' is not a column; "
                   "columns: image, question, options, answer")
    msg = _error(_vqa(path, columns=ColumnMap(options=("A", "B"))))
    assert "data.columns.options='A' is not a column" in msg


def test_bad_answer_index(tmp_path):
    path = _jsonl(tmp_path, [GOOD, GOOD, {**GOOD, "answer": 5}, GOOD])
    assert _error(_vqa(path)) == f"{path}: row 2 (id bad-2): answer index 5 is out of range for 2 options " \
                                 "(indices count from 0)"
    path = _jsonl(tmp_path, [GOOD, {**GOOD, "answer": "D"}, GOOD], "letter.jsonl")
    assert "row 1 (id letter-1): answer letter D is out of range for 2 options" in _error(_vqa(path))
    path = _jsonl(tmp_path, [GOOD, {**GOOD, "answer": "purple"}, GOOD], "text.jsonl")
    assert "row 1 (id text-1): answer 'purple' is not an option index (from 0), letter or text; options: a, b" \
        in _error(_vqa(path))


def test_bad_image_path(tmp_path):
    path = _jsonl(tmp_path, [GOOD, {**GOOD, "image": "missing/x.png"}, GOOD])
    msg = _error(_vqa(path))
    assert msg.startswith(f"{path}: row 1 (id bad-1): image file {tmp_path / 'missing' / 'x.png'} does not exist")


def test_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    path = _jsonl(tmp_path, [GOOD, {**GOOD, "image": "broken.png"}, GOOD])
    msg = _error(_vqa(path))
    assert msg.startswith(f"{path}: row 1 (id bad-1): image {tmp_path / 'broken.png'} is not a readable image (")


def test_empty_files(tmp_path):
    for name in ("empty.jsonl", "empty.csv", "empty.parquet"):
        (tmp_path / name).write_bytes(b"")
        assert _error(_vqa(tmp_path / name)) == f"{tmp_path / name}: the file is empty"
    (tmp_path / "header.csv").write_text("image,question,answer\n")
    assert _error(_vqa(tmp_path / "header.csv")) == f"{tmp_path / 'header.csv'}: no rows"
    (tmp_path / "empty-dir").mkdir()
    assert "no data files" in _error(_vqa(tmp_path / "empty-dir"))


def test_n_shots_larger_than_the_data(tmp_path):
    path = _jsonl(tmp_path, [GOOD] * 4)
    assert _error(_vqa(path, n_shots=4)) == (f"data.n_shots=4 but {path} has 4 samples, and the held-out set "
                                             "needs at least one; lower data.n_shots")


def test_mixed_kinds_in_one_file(tmp_path):
    path = _jsonl(tmp_path, [GOOD, GOOD, {"image": "ok.png", "question": "q", "answer": "free text"}, GOOD])
    assert _error(_vqa(path)) == (f"{path}: row 2 (id bad-2) is open-ended but row 0 is multiple-choice; "
                                  "one data set holds one kind of question")
    path = _jsonl(tmp_path, [{"image": "ok.png", "question": "q", "answer": "x"},
                             {"image": "ok.png", "question": "q"}], "half.jsonl")
    assert "row 1 (id half-1) is unlabelled but row 0 is open-ended" in _error(_vqa(path, n_shots=1))


def test_missing_image_column_and_question(tmp_path):
    path = _write_table(tmp_path / "noimg.jsonl", [{"question": "q", "answer": "x"}] * 3)
    assert "no image column (looked for image, img" in _error(_vqa(path))
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    path = _write_table(tmp_path / "noq.jsonl", [{"image": "ok.png", "answer": "x"}] * 3)
    assert "no question column" in _error(_vqa(path)) and "data.prompt" in _error(_vqa(path))


def test_split_kinds_must_match(tmp_path):
    root = tmp_path / "hub"
    _truth_rows = _truth()
    _write_table(root / "data" / "train-0.parquet", [_record(r, "open1", "parquet", r["image"]) for r in _truth_rows[:6]])
    _write_table(root / "data" / "test-0.parquet", [_record(r, "unlabelled", "parquet", r["image"]) for r in _truth_rows[6:]])
    assert "few-shot split train of" in _error(_vqa(root)) and "held-out split test is unlabelled" in _error(_vqa(root))


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"dataset": "vqa"}, "data.source is required for dataset: vqa"),
        ({"columns": ColumnMap(image="img")}, "data.columns does not apply to dataset: synthetic"),
        ({"source": "x"}, "data.source does not apply to dataset: synthetic"),
        ({"dataset": "scienceqa", "prompt": "q"}, "data.prompt does not apply to dataset: scienceqa"),
        ({"kind": "open"}, "data.kind='open' is not a task kind"),
        ({"dataset": "vqa", "source": "x.jsonl", "columns": ColumnMap(options=())}, "data.columns.options"),
    ],
)
def test_bad_data_configs(kw, pattern):
    with pytest.raises(DataError, match=pattern):
        load_task(DataConfig(**kw))


# ---------------------------------------------------------------- the experiment YAML's data section


def test_yaml_data_section(tmp_path):
    source, _ = make_source(tmp_path, "csv", "mc")
    (tmp_path / "space.yaml").write_text("params: {x_0: [0, 9]}\n")
    cfg = {"space": "space.yaml", "data": {
        "dataset": "vqa", "source": "csv/index.csv", "columns": {"options": ["A", "B", "C", "D"], "id": "id"},
        "kind": "multiple_choice", "n_shots": 4}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    assert loaded.data.source == source  # relative to the YAML's folder, made absolute
    assert loaded.data.columns == ColumnMap(options=("A", "B", "C", "D"), id="id")
    assert load_task(loaded.data).kind == "multiple_choice"
    assert config_from_dict(config_to_dict(loaded), resolve_space=False) == loaded  # what an experiment dir reopens
    cfg["data"]["columns"]["options"] = "choices"  # one name is a one-column list
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(path).data.columns.options == ("choices",)
    for bad, pattern in (({"kind": "open"}, r"data.kind='open' is not allowed; choose one of multiple_choice"),
                         ({"columns": {"answer": 3}}, r"data.columns.answer=3 has the wrong type"),
                         ({"columns": {"options": [1, 2]}}, r"data.columns.options=\[1, 2\] must be a name or a list"),
                         ({"columns": {"picture": "x"}}, r"unknown key data.columns.picture"),
                         ({"dataset": "synthetic"}, r"data.source does not apply to dataset: synthetic")):
        path.write_text(yaml.safe_dump({**cfg, "data": {**cfg["data"], **bad}}))
        with pytest.raises(ConfigError, match=pattern):
            load_config(path)


def test_example_data_and_yamls(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_examples", REPO / "experiments" / "data" / "make_examples.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "generated"
    made = {"mmbench-style": module.make_mmbench(out, 80, 0), "vizwiz-style": module.make_vizwiz(out, 80, 0),
            "unlabelled-images": module.make_unlabelled(out, 80, 0)}
    kinds = {"mmbench-style": "multiple_choice", "vizwiz-style": "open_ended", "unlabelled-images": "unlabelled"}
    for name, path in made.items():
        cfg = load_config(REPO / "experiments" / f"{name}.yaml")
        data = DataConfig(**{**cfg.data.__dict__, "source": str(path), "heldout_size": 16})
        task = load_task(data)
        assert task.kind == kinds[name] and (len(task.fewshot), len(task.heldout)) == (64, 16)
        if name == "vizwiz-style":
            assert all(len(a) == 10 for a in task.heldout["answers"])
