"""One writer per experiment directory: the driver lock held by `search` and `resume` for their whole run.

The lock is an `fcntl.flock` on `<dir>/.driver.lock`, whose content names the holder as JSON (host,
pid, command, start time, heartbeat). The kernel drops a flock when its process dies (SIGKILL
included), so a lock left by a killed driver on this host is free at once, whatever the file
still says. On a shared filesystem whose locks do not reach other hosts, the JSON is the lease:
the holder rewrites `heartbeat_at` every LEASE_S / 4 seconds, and a holder on another host whose
heartbeat is older than LEASE_S is taken over (its process is gone or cut off). Readers
(`trials`, `report`, `export`) never take the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from efficientllava.errors import EfficientLLaVAError

LOCK_FILE = ".driver.lock"
LEASE_S = 120.0  # a holder on another host whose heartbeat is older than this is taken over



class ExperimentLockedError(EfficientLLaVAError):
    """Another process drives this experiment directory."""


def read_holder(lock_path: str | Path) -> dict[str, Any] | None:
    """The holder JSON in a lock file (None when empty, missing or unreadable)."""
    try:
        data = json.loads(Path(lock_path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _live_holder(path: Path, wait_s: float = 1.0) -> dict[str, Any] | None:
    """The holder of a flock another process holds: a holder that has just taken it writes its JSON a moment
    later (the file is empty, or still the last holder's released one), so read again for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = read_holder(path)
        if holder and not holder.get("released"):
            return holder
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def describe(holder: dict[str, Any] | None) -> str:
    """`pid 123 on host h (efficientllava resume, since 2026-11-25 18:02:11)`."""
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at", 0))))
    return (f"pid {holder.get('pid')} on host {holder.get('host')} "
            f"({holder.get('command', 'efficientllava')}, since {since})")


def _write(fd: int, holder: dict[str, Any]) -> None:
    """Replace the lock file's content with `holder` (in place: the flock is on this inode)."""
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _expired_elsewhere(holder: dict[str, Any] | None, host: str, now: float) -> bool:
    """True when `holder` is live on another host: a heartbeat younger than LEASE_S."""
    if not holder or holder.get("released") or holder.get("host") == host:
        return False  # same host: the flock is the truth (the kernel frees it when the pid dies)
    return now - float(holder.get("heartbeat_at", 0.0)) < LEASE_S


@contextlib.contextmanager
def driver_lock(root: str | Path, command: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold the experiment's driver lock for the block; yields the holder JSON.

    Raises ExperimentLockedError at once (no waiting) when another process holds it, or another
    `driver_lock` block of this process (a flock belongs to its open file, not to the process).
    """
    root = Path(root).resolve()
    path = root / LOCK_FILE
    host = socket.gethostname()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExperimentLockedError(_busy(root, _live_holder(path))) from None
        previous = read_holder(path)
        if _expired_elsewhere(previous, host, time.time()):
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise ExperimentLockedError(_busy(root, previous, lease=True))
        now = time.time()
        holder = {"host": host, "pid": os.getpid(), "started_at": now, "heartbeat_at": now,
                  "command": command or " ".join(["efficientllava", *sys.argv[1:2]])}
        _write(fd, holder)
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(fd, holder, stop), name="driver-lock-heartbeat",
                                daemon=True)
        beat.start()
        try:
            yield holder
        finally:
            stop.set()
            beat.join(timeout=5)
            with contextlib.suppress(OSError):
                _write(fd, {**holder, "released": True, "released_at": time.time()})
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _heartbeat(fd: int, holder: dict[str, Any], stop: threading.Event) -> None:
    """Refresh the holder's heartbeat until `stop` (a full disk only delays it)."""
    while not stop.wait(LEASE_S / 4):
        holder["heartbeat_at"] = time.time()
        with contextlib.suppress(OSError):
            _write(fd, holder)


def _busy(root: Path, holder: dict[str, Any] | None, lease: bool = False) -> str:
    """The one-line refusal: who holds the directory and what to do."""
    who = describe(holder)
    if lease:
        age = time.time() - float((holder or {}).get("heartbeat_at", 0.0))
        return (f"{root} is being searched by {who}, alive {age:.0f} s ago (lease {LEASE_S:.0f} s); wait for "
                f"it to end or stop it there, then run `efficientllava resume {root}`")
    return (f"{root} is being searched by {who}; wait for it to end, or stop it (kill "
            f"{(holder or {}).get('pid', '<pid>')}) and run `efficientllava resume {root}`; "
            "readers (trials, report, export) work meanwhile")
