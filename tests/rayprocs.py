"""Find and kill the processes of one test's private Ray cluster (never `ray stop`: other runs may share the machine)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def ray_processes(marker: str) -> list[int]:
    """Live processes of the Ray cluster under temp dir `marker`.

    Matched on the command line, the environment (RAY_TMPDIR), or an open file under the temp dir:
    Ray's agents rename themselves and blank their environment, but keep their log files open.
    """
    needle, pids = marker.encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().split(") ")[-1].startswith("Z"):
                continue  # a zombie holds no resources
            found = needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes()
            if not found:
                found = any(needle in os.readlink(fd).encode() for fd in (entry / "fd").iterdir())
        except OSError:
            continue
        if found:
            pids.append(int(entry.name))
    return pids


def kill_ray(marker: str, timeout: float = 15.0) -> list[int]:
    """SIGKILL the processes of the Ray cluster under `marker`, one pid at a time; returns those found."""
    found = ray_processes(marker)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while ray_processes(marker) and time.time() < deadline:
        time.sleep(0.1)
    return found
