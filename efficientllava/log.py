"""Logging: one logger per module under "efficientllava", configured once per process.

The CLI calls `configure` with the level from `--quiet` / `--verbose`; Ray workers call it with
the driver's level, so their lines (forwarded by Ray to the driver's console) follow it too.
Library code never prints progress: it logs.
"""

from __future__ import annotations

import logging
import sys

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


def configure(level: int = logging.INFO) -> None:
    """Send the package's log records at `level` and above to stderr, one line each (idempotent)."""
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    root.propagate = False  # Ray and other libraries configure the root logger; keep our lines single
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler(sys.stderr)
        root.addHandler(handler)
    handler.setFormatter(logging.Formatter(DEBUG_FORMAT if level <= logging.DEBUG else FORMAT))


def current_level() -> int:
    """The package's effective level (what workers are configured with)."""
    return logging.getLogger(ROOT).getEffectiveLevel()
