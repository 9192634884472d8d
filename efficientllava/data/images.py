"""A data set's images, given as image features, bytes, paths (relative to the index file), base64 text or URLs.

`image_storage` turns an image column into `datasets` Image storage ({bytes, path}, not decoded)
and checks that every local file exists; `checked_images` opens the images of the rows actually
drawn (so a broken file is reported before any model work) and embeds the bytes of URL images,
which are fetched once.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from efficientllava.errors import DataError

STORAGE = datasets.Features({"image": datasets.Image(decode=False)})
URL_TIMEOUT_S = 20.0
_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}$")
_CHECK_SIZE = (64, 64)  # JPEGs decode at reduced scale for the check (draft mode): fast, still catches truncation


def is_url(path: str | None) -> bool:
    """True for http(s) image locations."""
    return bool(path) and str(path).startswith(("http://", "https://"))


def row_name(row: int, ids: Sequence[str] | None) -> str:
    """How messages name a row: its index in the split (data rows counted from 0) and its id when known."""
    return f"row {row} (id {ids[row]})" if ids is not None and ids[row] else f"row {row}"


def image_storage(table: datasets.Dataset, column: str, base_dir: Path | None, where: str,
                  ids: Sequence[str] | None = None) -> datasets.Dataset:
    """The image column of `table` as a one-column dataset `image` of undecoded Image storage."""
    feature = table.features[column]
    if isinstance(feature, datasets.Image) or isinstance(feature, dict) and {"bytes", "path"} >= set(feature):
        storage = table.select_columns([column]).cast(datasets.Features({column: datasets.Image(decode=False)}))
        return _fix_paths(storage.rename_column(column, "image") if column != "image" else storage,
                          base_dir, where, ids)
    arrow = table.with_format("arrow")[column]
    if pa.types.is_binary(arrow.type) or pa.types.is_large_binary(arrow.type):
        values = [{"bytes": _need(v, row, column, where, ids), "path": None}
                  for row, v in enumerate(arrow.to_pylist())]
    elif pa.types.is_string(arrow.type) or pa.types.is_large_string(arrow.type):
        values = [_from_text(_need(v, row, column, where, ids), row, base_dir, where, ids)
                  for row, v in enumerate(arrow.to_pylist())]
    else:
        raise DataError(f"{where}: column {column!r} holds {arrow.type}; expected images, image bytes, "
                        "file paths, base64 text or URLs")
    return datasets.Dataset.from_dict({"image": values}, features=STORAGE)


def _need(value, row: int, column: str, where: str, ids: Sequence[str] | None):
    if value is None or value == "" or value == b"":
        raise DataError(f"{where}: {row_name(row, ids)} has no image (column {column!r} is empty)")
    return value


def _from_text(text: str, row: int, base_dir: Path | None, where: str, ids: Sequence[str] | None) -> dict:
    """Storage for a path, URL, data URI or base64 text."""
    text = text.strip()
    if is_url(text):
        return {"bytes": None, "path": text}
    if text.startswith("data:image/") and "," in text:
        return {"bytes": _b64(text.split(",", 1)[1], row, where, ids), "path": None}
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_file():
        return {"bytes": None, "path": str(path.resolve())}
    if len(text) >= 64 and "." not in text[-6:] and _BASE64.match(text):  # MMBench's TSV embeds base64 images
        return {"bytes": _b64(text, row, where, ids), "path": None}
    hint = f" (relative paths resolve against {base_dir})" if base_dir is not None and not Path(text).is_absolute() else ""
    raise DataError(f"{where}: {row_name(row, ids)}: image file {path} does not exist{hint}")


def _b64(text: str, row: int, where: str, ids: Sequence[str] | None) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{where}: {row_name(row, ids)}: image text is neither a file path nor valid base64 "
                        f"({e})") from e


def _fix_paths(storage: datasets.Dataset, base_dir: Path | None, where: str,
               ids: Sequence[str] | None) -> datasets.Dataset:
    """An Image column's rows with a path but no bytes: resolve the path and check it exists; no image is an error."""
    arrow = storage.with_format("arrow")["image"]
    has_bytes = pc.fill_null(pc.is_valid(pc.struct_field(arrow, "bytes")), False).to_pylist()
    if all(has_bytes):  # the usual Hub layout: every image embedded
        return storage
    values = []
    for row, (embedded, value) in enumerate(zip(has_bytes, arrow.to_pylist(), strict=True)):
        if embedded:
            values.append(value)
        elif not value or not value.get("path"):
            raise DataError(f"{where}: {row_name(row, ids)} has no image")
        else:
            values.append(_from_text(value["path"], row, base_dir, where, ids))
    return datasets.Dataset.from_dict({"image": values}, features=STORAGE)


def _fetch(url: str, row: int, where: str, ids: Sequence[str] | None) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 - http(s) only (is_url)
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"{where}: {row_name(row, ids)}: cannot fetch image {url} ({reason}); download the "
                        "images where they are reachable and give local paths in the image column") from e


def checked_images(storage: Sequence[dict], rows: Sequence[int], where: str,
                   ids: Sequence[str] | None = None) -> list[dict]:
    """Open every image once (`rows` are their indices in the split, for messages); URL images come back as bytes."""
    out = []
    for value, row in zip(storage, rows, strict=True):
        data, path = value.get("bytes"), value.get("path")
        if data is None and is_url(path):
            data = _fetch(str(path), row, where, ids)
            value = {"bytes": data, "path": path}
        what = path if data is None else "(embedded bytes)" if not path else f"{path} (embedded bytes)"
        try:
            if data is None:
                if not path or not Path(path).is_file():
                    raise DataError(f"{where}: {row_name(row, ids)}: image file {path} does not exist")
                im = Image.open(path)
            else:
                im = Image.open(io.BytesIO(data))
            with im:
                im.draft("RGB", _CHECK_SIZE)
                im.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{where}: {row_name(row, ids)}: image {what} is not a readable image "
                            f"({type(e).__name__}: {e})") from e
        out.append(value)
    return out

