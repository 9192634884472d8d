"""Where a data set's rows come from: a Hub dataset, a table file, a Hub-layout folder, an indexed or plain image folder.

Each source is read through `datasets` (parquet, JSON lines / JSON, CSV / TSV builders) into raw
tables with the data set's own columns; data/vqa.py maps those columns to the sample schema.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.exceptions import DatasetsError

from efficientllava.errors import DataError

# Errors that mean "the Hub copy cannot be had here"; the HTTP client's base error is not an OSError.
# ValueError: a Hub repo in another layout (e.g. one that needs a config name).
HUB_ERRORS: tuple[type[BaseException], ...] = (OSError, DatasetsError, ValueError)
try:
    from huggingface_hub.utils import httpx as _httpx

    HUB_ERRORS += (_httpx.HTTPError,)
except ImportError:  # pragma: no cover - older huggingface_hub uses requests (an OSError)
    pass

TABLE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Errors of the table builders on a malformed file (pyarrow parse errors, pandas ones are ValueErrors).
_READ_ERRORS = (OSError, DatasetsError, pa.ArrowException, ValueError, TypeError, StopIteration)


@dataclass(frozen=True)
class RawSplit:
    """One split of a source as read: its rows with the data set's own columns."""

    table: datasets.Dataset
    where: str  # what messages name: the file(s), or the Hub id and split
    base_dir: Path | None  # where relative image paths resolve (the index file's folder); None for the Hub
    name: str  # the split's name, or a one-file source's stem: the prefix of generated ids


@dataclass(frozen=True)
class Source:
    """A data source and its splits; a source without splits is one pool the few-shot set is drawn from."""

    label: str  # the source as the user wrote it
    form: str  # "hub" | "file" | "dir" (Hub layout: <split>-*.<ext>) | "images" (a plain image folder)
    splits: tuple[str, ...] = ()  # split names; () = one pool (a Hub dataset's splits are known once loaded)
    subset: str | None = None
    _files: dict[str, list[Path]] = field(default_factory=dict, repr=False)

    @property
    def has_splits(self) -> bool:
        """Whether the few-shot and held-out sets may come from separate named splits."""
        return self.form == "hub" or bool(self.splits)

    def read(self, split: str | None = None) -> RawSplit:
        """The rows of `split` (None for a one-pool source, or the pool of a source with one split)."""
        if self.form == "hub":
            return _read_hub(self.label, self.subset, split or "train")
        if self.form == "images":
            return _read_image_folder(Path(self.label).expanduser())
        if split is None:
            files = [f for fs in self._files.values() for f in fs]
            return _read_tables(files, files[0].stem.split("-")[0] if len(files) == 1 else "all")
        if split not in self._files:
            raise DataError(f"{self.label}: unknown split {split!r}; available splits: {', '.join(self.splits)}")
        return _read_tables(self._files[split], split)


def is_hub_id(source: str) -> bool:
    """True when `source` reads as a Hub dataset id (owner/name) rather than a local path."""
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and Path(source).suffix.lower() not in TABLE_FORMATS)


def open_source(source: str, subset: str | None = None) -> Source:
    """Classify `source` and list its splits; raise DataError when it is no file, folder or Hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in TABLE_FORMATS:
            raise DataError(f"{source}: not a data file; use .parquet, .jsonl, .json, .csv or .tsv "
                            "(or a folder, or a Hub dataset id)")
        return Source(source, "file", (), subset, {"all": [path]})
    if path.is_dir():
        return _open_dir(source, path)
    if is_hub_id(source):
        return Source(source, "hub", (), subset)
    raise DataError(f"{source}: no such file or directory; pass a local path or a Hub dataset id (owner/name)")


def _split_name(path: Path) -> str:
    """The split a Hub-layout file belongs to: test-00000-of-00001.parquet -> test; train.jsonl -> train."""
    return path.name.split("-")[0].split(".")[0]


def _open_dir(source: str, root: Path) -> Source:
    """A folder: table files (Hub layout data/<split>-*, or index files at the top), else image files."""
    for folder in (root / "data", root):
        tables = sorted(f for f in folder.glob("*") if f.is_file() and f.suffix.lower() in TABLE_FORMATS) \
            if folder.is_dir() else []
        if not tables:
            continue
        formats = {TABLE_FORMATS[f.suffix.lower()] for f in tables}
        if len(formats) > 1:
            raise DataError(f"{folder}: data files in several formats ({', '.join(f.name for f in tables)}); "
                            "keep one format per folder, or point data.source at one file")
        files: dict[str, list[Path]] = {}
        for f in tables:
            files.setdefault(_split_name(f), []).append(f)
        # One table, or one split's shards, is one pool: the few-shot and held-out sets are drawn from it.
        if len(tables) == 1 or len(files) == 1:
            return Source(source, "dir", (), None, {"all": tables})
        return Source(source, "dir", tuple(files), None, files)
    if any(f.suffix.lower() in IMAGE_SUFFIXES for f in root.rglob("*") if f.is_file()):
        return Source(source, "images")
    raise DataError(f"{source}: no data files (.parquet, .jsonl, .json, .csv, .tsv) in {root}/data or {root}, "
                    f"and no images ({', '.join(IMAGE_SUFFIXES)}); check data.source")


def _read_hub(hub_id: str, subset: str | None, split: str) -> RawSplit:
    """One split of a Hub dataset (from the cache when offline)."""
    try:
        dd = datasets.load_dataset(hub_id, subset)
    except HUB_ERRORS as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{hub_id}: cannot load Hub dataset {hub_id}{f' ({subset})' if subset else ''} "
            f"({type(e).__name__}: {reason}); pre-download it where the Hub is reachable with "
            f"`hf download --repo-type dataset {hub_id} --local-dir DIR` (older huggingface_hub: "
            "`huggingface-cli download ...`) and set data.source: DIR"
        ) from e
    if not isinstance(dd, datasets.DatasetDict):
        raise DataError(f"{hub_id}: not a map-style Hub dataset with splits")
    if split not in dd:
        raise DataError(f"{hub_id}: unknown split {split!r}; available splits: {', '.join(dd)} "
                        "(set data.fewshot_split and data.heldout_split)")
    return RawSplit(dd[split], f"{hub_id} ({split} split)", None, split)


def _read_tables(files: list[Path], split: str) -> RawSplit:
    """Table files of one format as one split; CSV cells read as text, so option and answer values keep their spelling."""
    where = ", ".join(map(str, files))
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: the file is empty")
    fmt = TABLE_FORMATS[files[0].suffix.lower()]
    kwargs: dict = {}
    if fmt == "csv":
        delimiter = "\t" if files[0].suffix.lower() == ".tsv" else ","
        header = _csv_header(files[0], delimiter)
        # Only empty cells are missing: "none" / "NA" are real VQA answers, not nulls.
        kwargs = {"delimiter": delimiter, "keep_default_na": False, "na_values": [""],
                  "features": datasets.Features({c: datasets.Value("string") for c in header})}
    try:
        # "train" is only the name of the one split inside `datasets`; `split` is the real one.
        table = datasets.load_dataset(fmt, data_files={"train": [str(f) for f in files]}, split="train", **kwargs)
    except _READ_ERRORS as e:
        if "corresponds to no data" in str(e):  # a header line and nothing else
            raise DataError(f"{where}: no rows") from e
        reason = str(e).splitlines()[0] if str(e) else "no rows"
        raise DataError(f"{where}: cannot read as {fmt}: {type(e).__name__}: {reason}") from e
    if len(table) == 0:
        raise DataError(f"{where}: no rows")
    return RawSplit(table, where, files[0].parent, split)


def _csv_header(path: Path, delimiter: str) -> list[str]:
    """The column names of a CSV / TSV file (its first line)."""
    csv.field_size_limit(1 << 30)  # base64-encoded images (MMBench's TSV) make long cells
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh, delimiter=delimiter), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the header line: {type(e).__name__}: {e}") from e
    if not header or not any(header):
        raise DataError(f"{path}: no header line; the first line must name the columns")
    return header


def _read_image_folder(root: Path) -> RawSplit:
    """Every image under `root` (sorted by path) as a table of image paths and ids; no questions, no answers."""
    root = root.resolve()
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    table = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "id": [f.relative_to(root).as_posix() for f in files]})
    return RawSplit(table, str(root), root, "all")
