"""Optuna's journal file backend, syncing to disk at the writes resume depends on.

Optuna fsyncs every append: an `ask` of 12 parameters is 14 appends, ~60 ms of a ~90 ms ask on a
busy 2-core machine. The journal is written by one driver process (the experiment's driver lock);
what a killed process wrote is in the kernel's page cache and survives it, so only an OS crash
could lose an unsynced append. Syncing when a trial's state changes (start, tell, fail) and when a
study is created flushes everything before it too, so a trial's params and user attrs are on disk
by its end; the trial records, which resume trusts first, are synced on every write.
"""

from __future__ import annotations

import json
import os
from typing import Any

from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file
from optuna.storages.journal._storage import JournalOperation

SYNC_OPS = frozenset({JournalOperation.CREATE_STUDY, JournalOperation.SET_TRIAL_STATE_VALUES,
                      JournalOperation.DISCARD_TRIALS})


class JournalBackend(JournalFileBackend):
    """JournalFileBackend that fsyncs only appends holding a study creation or a trial state change."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Append `logs` as JSON lines under Optuna's file lock; fsync when one of them is in SYNC_OPS."""
        with get_lock_file(self._lock):
            with open(self._file_path, "ab") as f:
                f.write(("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode())
                f.flush()
                if any(log.get("op_code") in SYNC_OPS for log in logs):
                    os.fsync(f.fileno())
