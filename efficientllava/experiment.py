"""The experiment directory: the one place that knows where an experiment's files live.

Layout of `<storage>/<name>-YYYYmmdd-HHMMSS/` (engine files; the problem adds its own, e.g.
`spaces/` and `projector/` for the pruning problem):

    config.yaml              the resolved ExperimentConfig (space path absolute)
    study.journal            Optuna JournalStorage: one study `round-<r>` per round; the source of truth
    state.json               format, status, current round, its RoundState, finished rounds' states (atomic)
    rounds/round-<r>/        Ray Tune's storage for round r (one `tune-<stamp>-<k>` run per start/resume),
                             timing-<start>.json per (re)start of the round, workers-<start>.json
    rounds/run-<start>.json  one per driver run: start, end, rounds run (whole-run timing)
    trials/<r>-<number>.json one record per finished trial (written atomically by the driver)
    trials.parquet           the trial table, rewritten after each round and at the end
    best_policy.json         the best trial over all rounds
    heldout.json             the problem's held-out comparison (when it has one)

Only the driver reads and writes this directory: workers get what they need through Ray, and trial
results come back to the driver, so the directory lives only on the driver's node (no shared
filesystem). With `storage:` set to a URI (s3://, gs://) only Ray Tune's round folders go there;
the experiment directory is then created under `./runs` (or where `experiment_dir` points).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from efficientllava.atomic import write_json_atomic, write_text_atomic
from efficientllava.config import ExperimentConfig, config_from_dict, config_to_dict
from efficientllava.errors import ConfigError, EfficientLLaVAError
from efficientllava.search.api import RoundState

__all__ = ["ExperimentDir", "create_experiment", "open_experiment", "write_json_atomic"]

STATUS_CREATED = "created"
STATUS_RUNNING = "running"
STATUS_DONE = "done"
# Version of the directory's layout. 2: problem-owned RoundState payloads with relative paths, engine
# trial numbers, records written by the driver. Directories without one were written by 0.1.
FORMAT = 2


def is_uri(path: str) -> bool:
    """True for storage URIs like s3://bucket/x (anything with a scheme), False for local paths."""
    return "://" in str(path)


class ExperimentDir:
    """Paths and small state files of one experiment directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"ExperimentDir({str(self.root)!r})"

    @property
    def name(self) -> str:
        """The experiment's unique name: its folder name (`<config name>-<stamp>`)."""
        return self.root.name

    config_path = property(lambda self: self.root / "config.yaml", doc="The resolved config.")
    journal_path = property(lambda self: self.root / "study.journal", doc="Optuna journal file.")
    state_path = property(lambda self: self.root / "state.json", doc="Search progress.")
    rounds_dir = property(lambda self: self.root / "rounds", doc="Ray Tune storage, per round.")
    trials_dir = property(lambda self: self.root / "trials", doc="One JSON per finished trial.")
    trials_parquet = property(lambda self: self.root / "trials.parquet", doc="The trial table.")
    best_policy_path = property(lambda self: self.root / "best_policy.json", doc="Best trial.")
    heldout_path = property(lambda self: self.root / "heldout.json", doc="Held-out comparison.")
    lock_path = property(lambda self: self.root / ".driver.lock", doc="Held by the running driver.")

    def round_dir(self, r: int) -> Path:
        """Local Ray Tune storage of round `r`."""
        return self.rounds_dir / f"round-{r}"

    def tune_storage(self, r: int, cfg: ExperimentConfig) -> str:
        """Tune's `storage_path` for round `r`: under the experiment, or under the `storage:` URI."""
        if is_uri(cfg.storage):
            return f"{cfg.storage.rstrip('/')}/{self.name}/rounds/round-{r}"
        return str(self.round_dir(r))

    def trial_path(self, r: int, number: int) -> Path:
        """The record of trial `number` of round `r` (the engine's number, not Optuna's)."""
        return self.trials_dir / f"{r}-{number}.json"

    def trial_paths(self) -> list[Path]:
        """All finished trial JSONs (temporary files excluded)."""
        if not self.trials_dir.is_dir():
            return []
        return sorted(p for p in self.trials_dir.glob("*.json") if not p.name.startswith("."))

    def load_config(self) -> ExperimentConfig:
        """The config the experiment was created with."""
        try:
            d = yaml.safe_load(self.config_path.read_text())
        except OSError as exc:
            raise ConfigError(f"{self.config_path}: cannot read ({exc.strerror})") from exc
        return config_from_dict(d, self.config_path, resolve_space=False)

    def storage(self) -> Any:
        """The Optuna storage holding every round's study (a journal file, see `efficientllava.journal`)."""
        from optuna.storages import JournalStorage

        from efficientllava.journal import JournalBackend

        return JournalStorage(JournalBackend(str(self.journal_path)))

    def read_state(self) -> dict[str, Any]:
        """state.json as a mapping (keys: format, status, round, state, history, updated_at)."""
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {"format": FORMAT, "status": STATUS_CREATED, "round": 0, "state": None, "history": []}

    def check_format(self) -> None:
        """Refuse to resume a directory written in another layout, with what to do instead."""
        found = self.read_state().get("format", 1)
        if found != FORMAT:
            raise ConfigError(
                f"{self.root} was written by {'an older' if found < FORMAT else 'a newer'} efficientllava "
                f"(experiment format {found}, this version reads {FORMAT}) and cannot be resumed by it; "
                f"start a new search with `efficientllava search {self.config_path}`, or resume it with "
                f"the efficientllava version that created it"
            )

    def write_state(self, status: str, state: RoundState | None, history: list[RoundState]) -> None:
        """Write state.json atomically."""
        write_json_atomic(self.state_path, {
            "format": FORMAT,
            "status": status,
            "round": state.round if state is not None else 0,
            "state": state.to_json() if state is not None else None,
            "history": [s.to_json() for s in history],
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

    def round_state(self) -> RoundState | None:
        """The current round's RoundState from state.json (None before round 0 is set up)."""
        s = self.read_state().get("state")
        return RoundState.from_json(s) if s else None

    def history(self) -> list[RoundState]:
        """The states of the rounds finished so far (all rounds once the search is done)."""
        return [RoundState.from_json(s) for s in self.read_state().get("history", [])]

    @contextlib.contextmanager
    def driver_lock(self) -> Iterator[None]:
        """Hold the directory's driver lock: a second search or resume of it fails at once."""
        with open(self.lock_path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                owner = fh.read().strip() or "another process"
                raise EfficientLLaVAError(
                    f"{self.root} is being searched by {owner}; wait for it to end (or stop it) "
                    "before resuming"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
            fh.flush()
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def create_experiment(cfg: ExperimentConfig, root: str | Path | None = None) -> ExperimentDir:
    """Create a fresh experiment directory (default `<storage>/<name>-<stamp>`); never overwrites one."""
    if root is None:
        base = Path("runs") if is_uri(cfg.storage) else Path(cfg.storage)
        root = base / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(
            f"{root}: already exists and is not empty; resume it with `efficientllava resume {root}` "
            "or choose another directory"
        )
    exp = ExperimentDir(root)
    for d in (exp.root, exp.trials_dir, exp.rounds_dir):
        d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(exp.config_path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    exp.write_state(STATUS_CREATED, None, [])
    return exp


def open_experiment(path: str | Path) -> ExperimentDir:
    """Open an existing experiment directory, with a clear error when `path` is not one."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{p}: no such experiment directory; pass the folder `efficientllava search` created")
    exp = ExperimentDir(p)
    if not exp.config_path.is_file():
        raise ConfigError(
            f"{p}: not an experiment directory (no config.yaml); pass a folder like runs/<name>-<stamp>"
        )
    return exp
