"""`efficientllava` command line: search, resume, trials, report, export, evaluate.

Enumerated options take their `choices` from the registries (pruning methods, data sets,
granularities), read only when an option is used or help is shown (hence the explicit metavars:
argparse would otherwise list the choices while building the parser), so a typo fails before any
model loads and `efficientllava trials` does not import torch.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from efficientllava import __version__
from efficientllava.errors import ConfigError, EfficientLLaVAError
from efficientllava.log import configure, get_logger, level_from_flags

log = get_logger(__name__)


class UsageError(EfficientLLaVAError):
    """A command-line argument argparse rejected."""


class LazyChoices(Sequence[str]):
    """Allowed values read from a registry on first use (membership test or help text)."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load
        self._values: tuple[str, ...] | None = None

    def _get(self) -> tuple[str, ...]:
        if self._values is None:
            self._values = tuple(self._load())
        return self._values

    def __getitem__(self, i: Any) -> Any:
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __contains__(self, value: object) -> bool:
        return value in self._get()


def _methods() -> tuple[str, ...]:
    """Pruning methods from their registry."""
    import efficientllava.pruning.methods as methods

    return methods.method_names()


def _datasets() -> tuple[str, ...]:
    """Data sets the loaders know."""
    from efficientllava.data import DATASETS

    return tuple(DATASETS)


def _granularities() -> tuple[str, ...]:
    """Unit granularities."""
    from efficientllava.pruning.units import GRANULARITIES

    return tuple(GRANULARITIES)


def _dtypes() -> tuple[str, ...]:
    """Model dtypes the config accepts."""
    from efficientllava.config import DTYPES

    return DTYPES


def _kinds() -> tuple[str, ...]:
    """Task kinds a data set may hold."""
    from efficientllava.data import KINDS

    return tuple(KINDS)


def _pattern(value: str) -> str:
    """A mask pattern: unstructured or N:M (checked by the space's own parser)."""
    from efficientllava.space import parse_pattern

    try:
        parse_pattern(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one `error: ...` line (exit 2) like every user error."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing usage and exiting."""
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _cmd_search(args: argparse.Namespace) -> None:
    from efficientllava.config import load_config
    from efficientllava.search.runner import run_search

    cfg = load_config(args.config)
    _prepare_model(cfg.model.spec)
    _finish(run_search(cfg, args.dir, heldout=not args.no_heldout))


def _cmd_resume(args: argparse.Namespace) -> None:
    from efficientllava.experiment_lock import driver_lock

    root = Path(args.dir)
    if not (root / "config.yaml").is_file():
        from efficientllava.experiment import open_experiment

        open_experiment(root)  # the one-line error for a path that is no experiment directory
    # The driver lock first, before pandas, torch or Ray are imported: a second driver of this directory
    # exits at once (in tens of milliseconds, not after the seconds those imports take).
    with driver_lock(root, "efficientllava resume"):
        from efficientllava.experiment import open_experiment
        from efficientllava.search.runner import resume_search

        exp = open_experiment(root)
        exp.check_format()
        _prepare_model(exp.load_config().model.spec)
        _finish(resume_search(root, heldout=not args.no_heldout, locked=True))


def _prepare_model(spec: str) -> None:
    """Train/cache the built-in tiny model here, on all local cores, before any Ray worker needs it."""
    if spec == "tiny":
        from efficientllava.models.tiny import ensure_tiny

        ensure_tiny()


def _finish(root: Path) -> None:
    """After a search: the report (with the held-out comparison the search wrote), and where things are."""
    from efficientllava.heldout import saved_heldout
    from efficientllava.report import write_report

    report = write_report(root, saved_heldout(root))
    log.info(f"report: {report}")
    log.info(f"trials: efficientllava trials {root}")
    print(root)


def _cmd_trials(args: argparse.Namespace) -> None:
    import pandas as pd

    from efficientllava.search.api import TrialStatus
    from efficientllava.trials import load_trials

    df = load_trials(args.dir)
    if args.top:
        df = df[df["status"] == TrialStatus.COMPLETE.value].sort_values("objective", ascending=False).head(args.top)
    out = args.csv or args.parquet
    if out and not Path(out).expanduser().resolve().parent.is_dir():
        raise ConfigError(f"{out}: its folder {Path(out).expanduser().resolve().parent} does not exist; create it "
                          "or choose another path")
    if args.csv:
        df.to_csv(args.csv, index=False)
        print(f"wrote {len(df)} trials to {args.csv}")
    elif args.parquet:
        df.to_parquet(args.parquet, index=False)
        print(f"wrote {len(df)} trials to {args.parquet}")
    else:
        cols = [c for c in ("round", "number", "status", "objective", "accuracy", "gap", "mean_sparsity",
                            "kept_fraction", "flops_speedup", "projector_version", "eval_s", "wall_s")
                if c in df.columns]
        with pd.option_context("display.max_rows", 500, "display.width", 200, "display.precision", 4):
            print(df[cols].to_string(index=False) if len(df) else "no finished trials yet")


def _cmd_report(args: argparse.Namespace) -> None:
    from efficientllava.heldout import saved_heldout
    from efficientllava.report import write_report

    if args.heldout:
        from efficientllava.search.runner import heldout_check

        heldout_check(args.dir)
    print(write_report(args.dir, saved_heldout(args.dir)))


def _cmd_export(args: argparse.Namespace) -> None:
    from efficientllava.export import checkpoint_family, export_experiment

    out = export_experiment(args.dir, args.out, trial=args.trial)
    cls = checkpoint_family(out).model_class_name
    print(f"exported to {out} (load with {cls}.from_pretrained({str(out)!r}))")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from efficientllava.config import ModelConfig
    from efficientllava.data import DataConfig
    from efficientllava.evaluate import evaluate

    report = evaluate(
        model=ModelConfig(spec=args.model, dtype=args.dtype, device=args.device),
        data=DataConfig(dataset=args.data, source=args.source, subset=args.subset, columns=_columns(args.columns),
                        kind=args.kind, prompt=args.prompt, n_shots=args.n_shots, seed=args.seed,
                        heldout_size=args.heldout_size),
        split=args.split, batch_size=args.batch_size, policy=args.policy, uniform=args.uniform,
        method=args.method, pattern=args.pattern, granularity=args.granularity, projector=args.projector,
        latency=args.latency, max_new_tokens=args.max_new_tokens,
    )
    print("\n".join(report.lines()))


def _columns(pairs: list[str] | None) -> Any:
    """--columns image=img question=q options=A,B,C,D -> a ColumnMap (as data.columns in an experiment YAML)."""
    import dataclasses

    from efficientllava.data import ColumnMap

    fields = {f.name for f in dataclasses.fields(ColumnMap)}
    given: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--columns {pair!r}: expected FIELD=COLUMN with FIELD one of {', '.join(sorted(fields))}")
        given[key] = tuple(v.strip() for v in value.split(",")) if key == "options" else value
    return ColumnMap(**given)


def _common() -> Parser:
    """Options every subcommand takes too (so `efficientllava search X --quiet` works)."""
    p = Parser(add_help=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only warnings and errors")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug lines, and Ray's own messages")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `efficientllava` command."""
    common = _common()
    p = Parser(prog="efficientllava", description="Generalisation-aware auto-pruning of LLaVA models.",
               parents=[common])
    p.add_argument("--version", action="version", version=f"efficientllava {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    s = sub.add_parser("search", help="run a policy search from an experiment YAML", parents=[common])
    s.add_argument("config", help="experiment YAML, e.g. experiments/tiny.yaml")
    s.add_argument("--dir", help="experiment directory to create (default: <storage>/<name>-<timestamp>)")
    s.add_argument("--no-heldout", action="store_true", help="skip the held-out comparison at the end")
    s.set_defaults(fn=_cmd_search)

    r = sub.add_parser("resume", help="continue a killed, crashed or preempted search from its directory",
                       parents=[common])
    r.add_argument("dir", help="the experiment directory")
    r.add_argument("--no-heldout", action="store_true", help="skip the held-out comparison at the end")
    r.set_defaults(fn=_cmd_resume)

    t = sub.add_parser("trials", help="print or save the trial table (works while a search runs)", parents=[common])
    t.add_argument("dir", help="the experiment directory")
    t.add_argument("--top", type=int, default=0, help="only the K best completed trials")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--csv", metavar="PATH", help="write the table as CSV")
    g.add_argument("--parquet", metavar="PATH", help="write the table as parquet")
    t.set_defaults(fn=_cmd_trials)

    rep = sub.add_parser("report", help="(re)write <dir>/report/report.html", parents=[common])
    rep.add_argument("dir", help="the experiment directory")
    rep.add_argument("--heldout", action="store_true", help="recompute the held-out comparison first (starts Ray)")
    rep.set_defaults(fn=_cmd_report)

    e = sub.add_parser("export", help="save a policy as a Hugging Face checkpoint (save_pretrained)", parents=[common])
    e.add_argument("dir", help="experiment directory")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--trial", help="ROUND-NUMBER of the trial to export (default: the best)")
    e.set_defaults(fn=_cmd_export)

    v = sub.add_parser("evaluate", help="a model's accuracy (exact match, VQA accuracy, or agreement with dense for "
                                        "open-ended / unlabelled data), optionally under a policy",
                       parents=[common])
    v.add_argument("--model", default="tiny", help="tiny, a hub id or a local checkpoint directory")
    v.add_argument("--data", default="synthetic", choices=LazyChoices(_datasets), metavar="NAME",
                   help="the data set: %(choices)s")
    v.add_argument("--source", help="hub id or local path of the data set (--data vqa: a Hub id, a parquet, JSONL "
                                    "or CSV file, a Hub-layout folder or a folder of images)")
    v.add_argument("--subset", help="a Hub dataset's configuration name (vqa)")
    v.add_argument("--columns", nargs="+", metavar="FIELD=COLUMN",
                   help="the data's own column names (vqa), e.g. image=img question=q options=A,B,C,D answer=label")
    v.add_argument("--kind", choices=LazyChoices(_kinds), metavar="KIND",
                   help="score the data as this kind: %(choices)s (default: as the data is)")
    v.add_argument("--prompt", help="the question of rows that have none, e.g. a plain image folder (vqa)")
    v.add_argument("--max-new-tokens", type=int, default=16,
                   help="token cap of greedy answers (open-ended and unlabelled data)")
    v.add_argument("--split", default="heldout", choices=("heldout", "fewshot"), help="which split to score")
    v.add_argument("--n-shots", type=int, default=64, help="size of the few-shot split")
    v.add_argument("--heldout-size", type=int, default=512, help="size of the held-out split")
    v.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw")
    v.add_argument("--batch-size", type=int, default=32, help="samples per forward pass")
    v.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    v.add_argument("--dtype", default="auto", choices=LazyChoices(_dtypes), metavar="DTYPE",
                   help="weights' dtype: %(choices)s")
    pol = v.add_mutually_exclusive_group()
    pol.add_argument("--policy", help="policy.json to materialise before evaluating")
    pol.add_argument("--uniform", type=float, help="prune every unit to this sparsity")
    v.add_argument("--method", default="sparsegpt", choices=LazyChoices(_methods), metavar="NAME",
                   help="pruning method: %(choices)s")
    v.add_argument("--pattern", default="unstructured", type=_pattern, help="unstructured or N:M, e.g. 2:4")
    v.add_argument("--granularity", default="layer", choices=LazyChoices(_granularities), metavar="NAME",
                   help="unit granularity (for --uniform): %(choices)s")
    v.add_argument("--projector", help="projector safetensors to load (from an experiment's projector/)")
    v.add_argument("--latency", action="store_true", help="also measure forward latency")
    v.set_defaults(fn=_cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `efficientllava` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        # A local Ray cluster (Ray >= 2.52) gets token authentication, generating ~/.ray/auth_token if
        # missing; left unset, Ray >= 2.60 turns it on by default and warns that it did. Asking for it
        # explicitly keeps it on, quietly. Only before `import ray`: Ray reads it into its config then,
        # and a process whose config disagrees with its cluster's cannot connect. RAY_AUTH_MODE=disabled
        # in the environment opts out, as Ray documents.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        configure(level_from_flags(getattr(args, "quiet", False), getattr(args, "verbose", False)))
        args.fn(args)
    except EfficientLLaVAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {ConfigError(f'no such file: {exc.filename}')}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from efficientllava.atomic import disk_full

        where = exc.filename or getattr(args, "dir", None) or "a file"
        print(f"error: {disk_full(where)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished trials are kept: continue with `efficientllava resume DIR`", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
