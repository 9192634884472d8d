"""Atomic file writes: a reader (or a kill) sees the old file or the new one, never a partial one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from efficientllava.errors import DiskFullError


def _write_atomic(path: str | Path, mode: str, write: Callable[[IO[Any]], object]) -> Path:
    """Write through `write` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    size = 0
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            size = f.tell()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, size) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def disk_full(path: str | Path, needed: int | None = None) -> DiskFullError:
    """The one-line error for a write to `path` that found the disk full, with what to do."""
    path = Path(path)
    root = next((p for p in (path.resolve(), *path.resolve().parents) if (p / "config.yaml").is_file() and (p / "trials").is_dir()),
                None)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    todo = f"free space and run `efficientllava resume {root}`" if root is not None else "free space and run it again"
    need = f"{needed} bytes to write, " if needed else ""
    return DiskFullError(f"{path}: no space left on device ({need}{max(free, 0) / 1e6:.1f} MB free there); the old "
                         f"file (if any) is intact; {todo}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return _write_atomic(path, "w", lambda f: f.write(text))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return _write_atomic(path, "wb", lambda f: f.write(data))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path` atomically (numpy scalars and paths allowed)."""
    return _write_atomic(path, "w", lambda f: json.dump(obj, f, indent=1, sort_keys=True, default=_json_default))


def _json_default(o: Any) -> Any:
    """JSON fallback for numpy scalars and paths."""
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
