"""The experiment directory: the one place that knows where an experiment's files live.

Layout of `<storage>/<name>-YYYYmmdd-HHMMSS/` (engine files; the problem adds its own, e.g.
`spaces/` and `projector/` for the pruning problem):

    .driver.lock             held by the running search/resume (efficientllava.experiment_lock): host, pid, start
    config.yaml              the resolved ExperimentConfig (`space: space.yaml`, relative to the directory)
    space.yaml               the configured search space, copied in at creation
    study.journal            Optuna JournalStorage: one study `round-<r>` per round; the source of truth
    state.json               format, status, current round, its RoundState, finished rounds' states (atomic)
    rounds/tune/             Ray Tune's storage (one `tune-<stamp>` run per driver run, all its rounds)
    rounds/round-<r>/        timing-<start>.json per (re)start of round r, workers-<start>.json
    rounds/run-<start>.json  one per driver run: start, end, rounds run (whole-run timing)
    rounds/round-<r>/state.json  round r's RoundState (state.json is rebuilt from these and the records)
    trials/<r>-<number>.json one record per finished trial (written atomically by the driver): THE record;
                             the journal is rebuilt from them when damaged (efficientllava.recovery)
    trials.parquet           the trial table, rewritten after each round and at the end
    best_policy.json         the best trial over all rounds
    heldout.json             the problem's held-out comparison (when it has one)

Only the driver reads and writes this directory: workers get what they need through Ray, and trial
results come back to the driver, so the directory lives only on the driver's node (no shared
filesystem). With `storage:` set to a URI (s3://, gs://) only Ray Tune's folder goes there;
the experiment directory is then created under `./runs` (or where `experiment_dir` points).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

from efficientllava.atomic import write_json_atomic, write_text_atomic
from efficientllava.config import ExperimentConfig, config_from_dict, config_to_dict
from efficientllava.errors import ConfigError, DamagedFileError
from efficientllava.experiment_lock import LOCK_FILE, driver_lock
from efficientllava.search.api import RoundState

__all__ = ["ExperimentDir", "create_experiment", "open_experiment", "write_json_atomic"]

CONFIG_TODO = ("restore it from the experiment YAML the search was started with (keep `space:` pointing at the "
               "space.yaml in this directory), then run the command again")
# config.yaml's first line: the sha256 of the lines below it. Every key is written, but most have defaults, so a
# file cut short can still parse as a valid (different) config; the digest tells it from the one written.
CONFIG_HEADER = "# efficientllava experiment config; sha256 of the lines below: "
STATUS_CREATED = "created"
STATUS_RUNNING = "running"
STATUS_DONE = "done"
# Version of the directory's layout. 2: problem-owned RoundState payloads with relative paths, engine
# trial numbers, records written by the driver. Directories without one were written by 0.1.
FORMAT = 2
SPACE_FILE = "space.yaml"  # the configured search space, copied in at creation


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
    lock_path = property(lambda self: self.root / LOCK_FILE, doc="Held by the running driver.")

    def round_dir(self, r: int) -> Path:
        """Round `r`'s timing and state files."""
        return self.rounds_dir / f"round-{r}"

    def tune_storage(self, cfg: ExperimentConfig) -> str:
        """Tune's `storage_path` (one Tune run per driver run): under the experiment, or under the `storage:` URI."""
        if is_uri(cfg.storage):
            return f"{cfg.storage.rstrip('/')}/{self.name}/rounds/tune"
        return str(self.rounds_dir / "tune")

    def trial_path(self, r: int, number: int) -> Path:
        """The record of trial `number` of round `r` (the engine's number, not Optuna's)."""
        return self.trials_dir / f"{r}-{number}.json"

    def trial_paths(self) -> list[Path]:
        """All finished trial JSONs (temporary files excluded)."""
        if not self.trials_dir.is_dir():
            return []
        return sorted(p for p in self.trials_dir.glob("*.json") if not p.name.startswith("."))

    def load_config(self) -> ExperimentConfig:
        """The config the experiment was created with (a relative `space:` is inside the directory)."""
        try:
            text = self.config_path.read_text()
            _check_config_digest(self.config_path, text)
            d = yaml.safe_load(text)
        except OSError as exc:
            raise ConfigError(f"{self.config_path}: cannot read ({exc.strerror})") from exc
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DamagedFileError(self.config_path, f"damaged, not valid YAML ({str(exc).splitlines()[0]})",
                                   CONFIG_TODO) from None
        if not isinstance(d, dict):
            raise DamagedFileError(self.config_path, "damaged (not a mapping of keys)", CONFIG_TODO)
        cfg = config_from_dict(d, self.config_path, resolve_space=False)
        if not Path(cfg.space).is_absolute():
            cfg = dataclasses.replace(cfg, space=str(self.root / cfg.space))
        return cfg

    def storage(self) -> Any:
        """The Optuna storage holding every round's study (a journal file, see `efficientllava.journal`)."""
        from optuna.storages import JournalStorage

        from efficientllava.journal import JournalBackend

        return JournalStorage(JournalBackend(str(self.journal_path)))

    def read_state(self) -> dict[str, Any]:
        """state.json as a mapping (keys: format, status, round, state, history, updated_at).

        A missing file reads as a fresh experiment; a damaged one raises DamagedFileError (resume
        rebuilds it from the directory: `efficientllava.recovery`).
        """
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return {"format": FORMAT, "status": STATUS_CREATED, "round": 0, "state": None, "history": []}
        except OSError as exc:
            raise DamagedFileError(self.state_path, f"cannot read ({exc.strerror})", self.state_todo) from None
        except UnicodeDecodeError:
            raise DamagedFileError(self.state_path, "damaged (not UTF-8 text)", self.state_todo) from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            RoundState.from_json(data["state"]) if data.get("state") else None
            [RoundState.from_json(h) for h in data.get("history", [])]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DamagedFileError(self.state_path, f"damaged ({type(exc).__name__}: {str(exc)[:80]})",
                                   self.state_todo) from None
        return data

    @property
    def state_todo(self) -> str:
        """What to do about a damaged state.json."""
        return f"run `efficientllava resume {self.root}` to rebuild it from the trial records and round files"

    def round_state_path(self, r: int) -> Path:
        """The record of round `r`'s RoundState (written when the round is set up; state.json can be rebuilt from these)."""
        return self.round_dir(r) / "state.json"

    def check_format(self) -> None:
        """Refuse to resume a directory written in another layout, with what to do instead."""
        try:
            found = self.read_state().get("format", 1)
        except DamagedFileError:
            return  # the driver rebuilds state.json (in the current format) from the directory

        if found != FORMAT:
            raise ConfigError(
                f"{self.root} was written by {'an older' if found < FORMAT else 'a newer'} efficientllava "
                f"(experiment format {found}, this version reads {FORMAT}) and cannot be resumed by it; "
                f"start a new search with `efficientllava search {self.config_path}`, or resume it with "
                f"the efficientllava version that created it"
            )

    def write_state(self, status: str, state: RoundState | None, history: list[RoundState]) -> None:
        """Write state.json atomically (and the current round's RoundState beside its Tune runs)."""
        if state is not None:
            path = self.round_state_path(state.round)
            if not path.is_file():
                write_json_atomic(path, state.to_json())
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

    def driver_lock(self, command: str | None = None) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """Hold the directory's driver lock (efficientllava.experiment_lock): a second driver fails at once."""
        return driver_lock(self.root, command)


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
    # The space travels with the directory (which can then be moved or copied) and is named relative to it.
    space = Path(cfg.space)
    if space.is_file():
        write_text_atomic(exp.root / SPACE_FILE, space.read_text())
        cfg = dataclasses.replace(cfg, space=SPACE_FILE)
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    write_text_atomic(exp.config_path, f"{CONFIG_HEADER}{hashlib.sha256(body.encode()).hexdigest()}\n{body}")
    exp.write_state(STATUS_CREATED, None, [])
    return exp


def _check_config_digest(path: Path, text: str) -> None:
    """Raise DamagedFileError when config.yaml's header digest does not match its body (no header: not checked,
    as in directories written before the header existed, or after a person removed it to accept an edit)."""
    if not text.startswith(CONFIG_HEADER):
        return
    header, _, body = text.partition("\n")
    if hashlib.sha256(body.encode()).hexdigest() != header[len(CONFIG_HEADER):].strip():
        raise DamagedFileError(path, "damaged or edited since the search wrote it (its sha256 does not match its first "
                                     "line)", CONFIG_TODO + "; to keep a deliberate edit, delete the first line")


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
