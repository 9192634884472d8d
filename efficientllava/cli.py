"""`efficientllava` command line: search, resume, trials, report, export, evaluate."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from efficientllava.errors import ConfigError, EfficientLLaVAError


def _cmd_search(args: argparse.Namespace) -> None:
    from efficientllava.config import load_config
    from efficientllava.search.runner import run_search

    cfg = load_config(args.config)
    _prepare_model(cfg.model.spec)
    root = run_search(cfg, args.dir)
    _finish(root, args.no_heldout)


def _cmd_resume(args: argparse.Namespace) -> None:
    from efficientllava.experiment import open_experiment
    from efficientllava.search.runner import resume_search

    _prepare_model(open_experiment(args.dir).load_config().model.spec)
    root = resume_search(args.dir)
    _finish(root, args.no_heldout)


def _prepare_model(spec: str) -> None:
    """Train/cache the built-in tiny model here, on all local cores, before any Ray worker needs it."""
    if spec == "tiny":
        from efficientllava.models.tiny import ensure_tiny

        ensure_tiny()


def _finish(root: Path, no_heldout: bool) -> None:
    """After a search: held-out comparison (on the trials' resources), report, summary lines."""
    from efficientllava.experiment import open_experiment
    from efficientllava.report import write_report

    if no_heldout:
        heldout = _saved_heldout(root)
    else:
        from efficientllava.heldout import heldout_comparison
        from efficientllava.problem import run_heavy

        cfg = open_experiment(root).load_config()
        heldout = run_heavy(cfg, heldout_comparison, cfg, str(root))
        for name, row in heldout.items():
            print(f"[held-out] {name:8s} accuracy {row['accuracy']:.4f}  mean sparsity {row['mean_sparsity']:.3f}  "
                  f"FLOPs speed-up {row['flops_speedup']:.2f}x", flush=True)
    report = write_report(root, heldout)
    print(f"[efficientllava] report: {report}\n[efficientllava] trials: efficientllava trials {root}\n{root}")


def _saved_heldout(root: Path) -> dict | None:
    """heldout.json when it still describes the current best policy (else None: it would mislead)."""
    saved, best = Path(root) / "heldout.json", Path(root) / "best_policy.json"
    if not (saved.is_file() and best.is_file()):
        return None
    heldout, current = json.loads(saved.read_text()), json.loads(best.read_text())
    same = (heldout.get("best", {}).get("round"), heldout.get("best", {}).get("objective")) == (
        current.get("round"), current.get("objective"))
    return heldout if same else None


def _cmd_trials(args: argparse.Namespace) -> None:
    import pandas as pd

    from efficientllava.trials import load_trials

    df = load_trials(args.dir)
    if args.top:
        df = df[df["status"] == "COMPLETE"].sort_values("objective", ascending=False).head(args.top)
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
    from efficientllava.report import write_report

    if args.heldout:
        from efficientllava.experiment import open_experiment
        from efficientllava.heldout import heldout_comparison
        from efficientllava.problem import run_heavy
        from efficientllava.search.runner import init_ray

        cfg = open_experiment(args.dir).load_config()
        init_ray()
        heldout = run_heavy(cfg, heldout_comparison, cfg, str(args.dir))
    else:
        heldout = _saved_heldout(Path(args.dir))
    print(write_report(args.dir, heldout))


def _cmd_export(args: argparse.Namespace) -> None:
    from efficientllava.export import checkpoint_family, export_experiment

    out = export_experiment(args.dir, args.out, trial=args.trial)
    cls = checkpoint_family(out).model_class_name
    print(f"exported to {out} (load with {cls}.from_pretrained({str(out)!r}))")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from efficientllava.evaluate import evaluate_cli

    evaluate_cli(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `efficientllava` command."""
    p = argparse.ArgumentParser(prog="efficientllava", description="Generalisation-aware auto-pruning of LLaVA models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run a policy search from an experiment YAML")
    s.add_argument("config", help="experiment YAML, e.g. experiments/tiny.yaml")
    s.add_argument("--dir", help="experiment directory to create (default: <storage>/<name>-<timestamp>)")
    s.add_argument("--no-heldout", action="store_true", help="skip the held-out comparison at the end")
    s.set_defaults(fn=_cmd_search)

    r = sub.add_parser("resume", help="continue a killed, crashed or preempted search from its directory")
    r.add_argument("dir")
    r.add_argument("--no-heldout", action="store_true", help="skip the held-out comparison at the end")
    r.set_defaults(fn=_cmd_resume)

    t = sub.add_parser("trials", help="print or save the trial table (works while a search runs)")
    t.add_argument("dir")
    t.add_argument("--top", type=int, default=0, help="only the K best completed trials")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--csv", metavar="PATH")
    g.add_argument("--parquet", metavar="PATH")
    t.set_defaults(fn=_cmd_trials)

    rep = sub.add_parser("report", help="(re)write <dir>/report/report.html")
    rep.add_argument("dir")
    rep.add_argument("--heldout", action="store_true", help="recompute the held-out comparison first")
    rep.set_defaults(fn=_cmd_report)

    e = sub.add_parser("export", help="save a policy as a Hugging Face checkpoint (save_pretrained)")
    e.add_argument("dir", help="experiment directory")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--trial", help="ROUND-NUMBER of the trial to export (default: the best)")
    e.set_defaults(fn=_cmd_export)

    v = sub.add_parser("evaluate", help="multiple-choice accuracy of a model, optionally under a policy")
    v.add_argument("--model", default="tiny", help="tiny, a hub id or a local checkpoint directory")
    v.add_argument("--data", default="synthetic", help="synthetic or scienceqa")
    v.add_argument("--source", help="hub id or local path of the data set")
    v.add_argument("--split", default="heldout", choices=("heldout", "fewshot"))
    v.add_argument("--n-shots", type=int, default=64)
    v.add_argument("--heldout-size", type=int, default=512)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--device", default="auto")
    v.add_argument("--dtype", default="auto")
    pol = v.add_mutually_exclusive_group()
    pol.add_argument("--policy", help="policy.json to materialise before evaluating")
    pol.add_argument("--uniform", type=float, help="prune every layer to this sparsity")
    v.add_argument("--method", default="sparsegpt", help="sparsegpt, wanda or magnitude")
    v.add_argument("--pattern", default="unstructured", help="unstructured, 2:4 or 4:8")
    v.add_argument("--granularity", default="layer",
                   help="units of --uniform: layer, sublayer (attention / MLP) or matrix (q, k, v, o, gate, up, down)")
    v.add_argument("--projector", help="projector safetensors to load (from an experiment's projector/)")
    v.add_argument("--latency", action="store_true", help="also measure forward latency")
    v.set_defaults(fn=_cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `efficientllava` console script."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.fn(args)
    except EfficientLLaVAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {ConfigError(f'no such file: {exc.filename}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished trials are kept: continue with `efficientllava resume DIR`", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
