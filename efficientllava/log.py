"""Logging: one logger per module under "efficientllava", configured once per process.

The CLI calls `configure` with the level from `--quiet` / `--verbose`; Ray workers call it with
the driver's level and `relay=True`: their records are kept in memory (`drain`) and the driver logs
them again (`replay`), so they reach the console as plain `[efficientllava]` lines instead of Ray's
`(EvalWorker pid=...)`-prefixed copy of the worker's stderr (which only `--verbose` shows).
Library code never prints progress: it logs.
"""

from __future__ import annotations

import collections
import logging
import sys
from collections.abc import Iterable

ROOT = "efficientllava"
FORMAT = "[efficientllava] %(message)s"
DEBUG_FORMAT = "%(asctime)s [efficientllava %(name)s %(levelname)s] %(message)s"


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (pass `__name__`)."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def level_from_flags(quiet: bool = False, verbose: bool = False) -> int:
    """WARNING for --quiet, DEBUG for --verbose, INFO otherwise."""
    return logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (tests and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        """Emit to the current sys.stderr."""
        self.stream = sys.stderr
        super().emit(record)


class _RelayBuffer(logging.Handler):
    """Keeps a worker's records (level, message) until the driver drains them; the oldest go beyond `cap`."""

    def __init__(self, cap: int = 10_000) -> None:
        super().__init__()
        self.records: collections.deque[tuple[int, str]] = collections.deque(maxlen=cap)

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record's level and its formatted message (with any traceback)."""
        self.records.append((record.levelno, self.format(record)))


def configure(level: int = logging.INFO, *, relay: bool = False) -> None:
    """Send the package's log records at `level` and above to stderr, one line each (idempotent); with
    `relay`, keep them for `drain` instead (a Ray worker whose driver shows them)."""
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    root.propagate = False  # Ray and other libraries configure the root logger; keep our lines single
    kind = _RelayBuffer if relay else _StderrHandler
    for old in [h for h in root.handlers if isinstance(h, (_StderrHandler, _RelayBuffer)) and not isinstance(h, kind)]:
        root.removeHandler(old)
    handler = next((h for h in root.handlers if isinstance(h, kind)), None)
    if handler is None:
        handler = _RelayBuffer() if relay else _StderrHandler(sys.stderr)
        root.addHandler(handler)
    handler.setFormatter(logging.Formatter("%(message)s" if relay else
                                           DEBUG_FORMAT if level <= logging.DEBUG else FORMAT))


def drain() -> list[tuple[int, str]]:
    """The records kept since the last call (level, message), oldest first; empty unless `relay` is on."""
    buffer = next((h for h in logging.getLogger(ROOT).handlers if isinstance(h, _RelayBuffer)), None)
    if buffer is None:
        return []
    out = list(buffer.records)
    buffer.records.clear()
    return out


def replay(records: Iterable[tuple[int, str]], name: str = f"{ROOT}.worker") -> None:
    """Log records drained on a worker again here (each at its own level)."""
    logger = logging.getLogger(name)
    for level, message in records:
        logger.log(level, message)


def current_level() -> int:
    """The package's effective level (what workers are configured with)."""
    return logging.getLogger(ROOT).getEffectiveLevel()
