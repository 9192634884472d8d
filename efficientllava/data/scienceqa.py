"""ScienceQA (image questions only) from the Hub, a local copy of the Hub repo, or one parquet file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets.exceptions import DatasetsError

from efficientllava.data.schema import FEATURES, validate_samples
from efficientllava.data.sources import HUB_ERRORS
from efficientllava.errors import DataError

HUB_ID = "derek-thomas/ScienceQA"
# Columns of the Hub copy that the schema needs; hint/category/subject are optional (they default).
RAW_REQUIRED = ("image", "question", "choices", "answer")
_TEXT_INPUTS = ("hint", "category", "subject")


def source_kind(source: str | None) -> str:
    """Classify a ScienceQA source as "hub", "dir" or "file"; raise DataError if it is none of them."""
    if source is None:
        return "hub"
    path = Path(source).expanduser()
    if path.is_dir():
        return "dir"
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(
                f"ScienceQA source {source}: not a .parquet file; pass a .parquet file or a directory"
            )
        return "file"
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not source.endswith(".parquet"):
        return "hub"
    raise DataError(
        f"ScienceQA source {source}: no such file or directory; pass a local path or a Hub dataset id"
    )


def source_label(source: str | None) -> str:
    """The source as shown in messages and provenance: the Hub id or the local path."""
    return HUB_ID if source is None else source


def load_scienceqa(source: str | None = None, split: str = "train") -> datasets.Dataset:
    """Load ScienceQA's image questions of `split` from `source` (Hub id, repo directory or .parquet file)."""
    kind = source_kind(source)
    if kind == "hub" or source is None:
        raw, where = _load_hub(source_label(source), split)
    elif kind == "dir":
        raw, where = _load_dir(Path(source).expanduser(), split)
    else:
        path = Path(source).expanduser()
        # A single file has no split; its id prefix comes from the Hub-style name (test-00000-of-... -> test).
        split = path.name.split("-")[0].removesuffix(".parquet")
        raw, where = _load_parquet([path]), str(path)
    return _to_schema(raw, split, where)


def _load_hub(hub_id: str, split: str) -> tuple[datasets.Dataset, str]:
    """Load all splits of a Hub dataset (from the cache when offline) and return `split`."""
    try:
        dd = datasets.load_dataset(hub_id)
    except HUB_ERRORS as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"ScienceQA: cannot load Hub dataset {hub_id} ({type(e).__name__}: {reason}); pre-download it where the "
            f"Hub is reachable with `hf download --repo-type dataset {hub_id} --local-dir DIR` "
            "(older huggingface_hub: `huggingface-cli download ...`) and set data.source: DIR"
        ) from e
    if split not in dd:
        raise DataError(f"ScienceQA {hub_id}: unknown split {split!r}; available splits: {', '.join(dd)}")
    return dd[split], f"{hub_id} ({split} split)"


def _split_files(root: Path) -> dict[str, list[Path]]:
    """Map split name -> parquet files, preferring the Hub layout data/<split>-*.parquet over the top level."""
    found: dict[str, list[Path]] = {}
    for folder in (root / "data", root):
        local: dict[str, list[Path]] = {}
        for f in sorted(folder.glob("*.parquet")) if folder.is_dir() else ():
            local.setdefault(f.name.split("-")[0].removesuffix(".parquet"), []).append(f)
        for name, files in local.items():
            found.setdefault(name, files)
    return found


def _load_dir(root: Path, split: str) -> tuple[datasets.Dataset, str]:
    """Load `split` from a local directory laid out like the Hub repo."""
    splits = _split_files(root)
    if not splits:
        raise DataError(
            f"ScienceQA source {root}: no .parquet files in {root}/data or {root}; expected "
            f"data/<split>-*.parquet as in `hf download --repo-type dataset {HUB_ID} --local-dir {root}`"
        )
    if split not in splits:
        raise DataError(
            f"ScienceQA source {root}: unknown split {split!r}; available splits: {', '.join(splits)}"
        )
    files = splits[split]
    return _load_parquet(files), ", ".join(str(f) for f in files)


def _load_parquet(files: list[Path]) -> datasets.Dataset:
    """Read parquet files through `datasets` (cached, memory-mapped) as one split."""
    try:
        # "train" is only the name of the one split inside `datasets`; ids carry the real split name.
        return datasets.load_dataset("parquet", data_files={"train": [str(f) for f in files]}, split="train")
    except (OSError, DatasetsError, pa.ArrowException, ValueError) as e:
        raise DataError(
            f"ScienceQA: cannot read {', '.join(map(str, files))}: {type(e).__name__}: {e}"
        ) from e


def _has_image(column: pa.ChunkedArray) -> list[int]:
    """Row indices whose image is present (Image storage is struct<bytes, path>; text-only rows are null)."""
    valid = pc.is_valid(column)
    if pa.types.is_struct(column.type):
        names = {column.type.field(i).name for i in range(column.type.num_fields)}
        parts = [pc.is_valid(pc.struct_field(column, f)) for f in ("bytes", "path") if f in names]
        if parts:
            any_part = parts[0] if len(parts) == 1 else pc.or_(parts[0], parts[1])
            valid = pc.and_(valid, pc.fill_null(any_part, False))
    return [i for i, ok in enumerate(pc.fill_null(valid, False).to_pylist()) if ok]


def _to_schema(raw: datasets.Dataset, split: str, where: str) -> datasets.Dataset:
    """Keep image questions and map ScienceQA's columns to the sample schema."""
    missing = [c for c in RAW_REQUIRED if c not in raw.column_names]
    if missing:
        raise DataError(
            f"ScienceQA {where}: missing column(s) {', '.join(missing)}; have {', '.join(raw.column_names)} "
            f"(expected the {HUB_ID} layout)"
        )
    try:
        # Cast first so a plain struct / path column also reads as an Image (and answer int8 -> int64 later).
        if not isinstance(raw.features["image"], datasets.Image):
            raw = raw.cast_column("image", datasets.Image())
        keep = _has_image(raw.with_format("arrow")["image"])
        if not keep:  # map() would not run, so build the empty result directly
            return datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
        ids = [f"scienceqa-{split}-{i}" for i in range(len(raw))]
        ds = raw.add_column("id", ids).select(keep)
        inputs = [c for c in _TEXT_INPUTS if c in raw.column_names]
        ds = ds.map(
            _fields(inputs),
            batched=True,
            input_columns=["choices", *inputs],
            remove_columns=[c for c in ds.column_names if c not in ("id", "image", "question", "answer")],
            desc="ScienceQA -> schema",
        )
        ds = ds.cast(FEATURES).select_columns(list(FEATURES))
    except (ValueError, TypeError, pa.ArrowException, DatasetsError) as e:
        raise DataError(
            f"ScienceQA {where}: cannot convert to the sample schema: {type(e).__name__}: {e}"
        ) from e
    return validate_samples(ds, f"ScienceQA {where}")


def _fields(inputs: list[str]):
    """A batched map function from (choices, *optional text columns) to options/context/qtype."""

    def fn(choices: list[list[str]], *cols: Iterable[str | None]) -> dict[str, list]:
        got = dict(zip(inputs, cols, strict=True))
        n = len(choices)
        hint = got.get("hint", [""] * n)
        category = got.get("category", [""] * n)
        subject = got.get("subject", [""] * n)
        return {
            "options": choices,
            "answers": [[] for _ in range(n)],
            "context": [h or "" for h in hint],
            "qtype": [c or s or "" for c, s in zip(category, subject, strict=True)],
        }

    return fn
