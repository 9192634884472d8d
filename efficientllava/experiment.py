"""The experiment directory: the one place that knows where an experiment's files live.

Layout of `<storage>/<name>-YYYYmmdd-HHMMSS/`:

    config.yaml              the resolved ExperimentConfig (space path absolute)
    study.journal            Optuna JournalStorage: one study `round-<r>` per round; the source of truth
    state.json               status, current round, its RoundState, finished rounds' states (atomic writes)
    rounds/round-<r>/        Ray Tune's storage for round r (one `tune-<stamp>-<k>` run per start/resume),
                             and timing-<start>.json per (re)start of the round (wall seconds, trials done)
    trials/<r>-<number>.json one file per finished trial (written atomically by the trial itself)
    trials.parquet           the trial table, rewritten after each round and at the end
    best_policy.json         the best trial over all rounds
    spaces/                  search-space YAMLs per round (written by the problem)
    projector/               projector weights per version (written by the problem)

The experiment directory itself must be a local path. With `storage:` set to a URI (s3://, gs://)
only Ray Tune's round folders go there; the experiment directory is then created under `./runs`
(or where `experiment_dir` points) and, on a multi-node cluster, must be on a filesystem that every
node mounts (NFS or similar), because trial actors write their trial JSONs into it and the Optuna
journal file needs a shared, lockable file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from efficientllava.config import ExperimentConfig, config_from_dict, config_to_dict
from efficientllava.errors import ConfigError
from efficientllava.search.problem import RoundState

STATUS_CREATED = "created"
STATUS_RUNNING = "running"
STATUS_DONE = "done"


def is_uri(path: str) -> bool:
    """True for storage URIs like s3://bucket/x (anything with a scheme), False for local paths."""
    return "://" in str(path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so a reader (or a kill) sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(o: Any) -> Any:
    """JSON fallback for numpy scalars and paths."""
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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
    spaces_dir = property(lambda self: self.root / "spaces", doc="Search spaces per round.")
    projector_dir = property(lambda self: self.root / "projector", doc="Projector weights.")

    def round_dir(self, r: int) -> Path:
        """Local Ray Tune storage of round `r`."""
        return self.rounds_dir / f"round-{r}"

    def tune_storage(self, r: int, cfg: ExperimentConfig) -> str:
        """Tune's `storage_path` for round `r`: under the experiment, or under the `storage:` URI."""
        if is_uri(cfg.storage):
            return f"{cfg.storage.rstrip('/')}/{self.name}/rounds/round-{r}"
        return str(self.round_dir(r))

    def trial_path(self, r: int, number: int) -> Path:
        """The JSON of trial `number` (Optuna's number within round `r`'s study)."""
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

    def storage(self):
        """The Optuna storage holding every round's study (a journal file)."""
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(self.journal_path)))

    def read_state(self) -> dict[str, Any]:
        """state.json as a mapping (keys: status, round, state, history, updated_at)."""
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {"status": STATUS_CREATED, "round": 0, "state": None, "history": []}

    def write_state(self, status: str, round_: int, state: RoundState | None,
                    history: list[RoundState]) -> None:
        """Write state.json atomically."""
        write_json_atomic(self.state_path, {
            "status": status,
            "round": round_,
            "state": asdict(state) if state is not None else None,
            "history": [asdict(s) for s in history],
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

    def round_state(self) -> RoundState | None:
        """The current round's RoundState from state.json (None before round 0 is set up)."""
        s = self.read_state().get("state")
        return RoundState(**s) if s else None


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
    for d in (exp.root, exp.trials_dir, exp.rounds_dir, exp.spaces_dir, exp.projector_dir):
        d.mkdir(parents=True, exist_ok=True)
    tmp = exp.config_path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, exp.config_path)
    exp.write_state(STATUS_CREATED, 0, None, [])
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
