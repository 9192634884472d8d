"""One command for the day a GPU is lent: the real path on a LLaVA with LLaVA-1.5-7B-shaped decoder layers.

    python benchmarks/gpu_smoke.py [--layers auto] [--out DIR]      # CUDA: bf16, hidden 4096, MLP 11008
    python benchmarks/gpu_smoke.py --device cpu --small              # the same plumbing on a small CPU model

Builds a random-weight LLaVA (the tiny model's tokenizer and image processor, so the synthetic task runs;
decoder layers of LLaVA-1.5-7B's shape, as many as fit in GPU memory up to 32) in bf16, saves it with
`save_pretrained`, and runs, printing each figure:
  1. bank build: Wanda's nested-mask bank (all levels) and SparseGPT's compact bank (calibration state, then
     every level of layer 0's two units), with sizes against the dense linear bytes;
  2. materialise: a uniform 50% policy applied and restored, against a plain copy of the same weights, and
     the peak GPU memory;
  3. 2:4 semi-structured kernel latency against dense (torch.sparse.to_sparse_semi_structured) on one
     7B-shaped MLP matrix (CUDA only);
  4. a 2-round search with a projector round through the public CLI (`efficientllava search`), with
     `resources.gpu: 1` and again with `gpu: 0.5` (two trials sharing the GPU); on CPU, one search with
     `gpu: 0`;
  5. `efficientllava export` of the best policy, reloaded with plain `LlavaForConditionalGeneration`.
Without CUDA (and without --device cpu) it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

LEVELS = (0.0, 0.3, 0.5, 0.7)
SEVEN_B = {"text_hidden": 4096, "text_intermediate": 11008, "text_heads": 32}
SMALL = {"text_hidden": 64, "text_intermediate": 128, "text_heads": 4, "text_layers": 2, "vision_layers": 1}
LAYER_PARAMS_7B = 4 * 4096 * 4096 + 3 * 4096 * 11008


def say(what: str, figure: str) -> None:
    """One figure per line: `[smoke] what: figure`."""
    print(f"[smoke] {what}: {figure}", flush=True)


def auto_layers(device: torch.device, concurrent: int = 2) -> int:
    """Decoder layers that fit: per trial the bf16 model plus the Materializer's dense copy, `concurrent` trials."""
    free, _ = torch.cuda.mem_get_info(device)
    per_layer = LAYER_PARAMS_7B * 2 * 2 * concurrent
    return max(1, min(32, int(0.6 * free / per_layer)))


def build_checkpoint(path: Path, small: bool, layers: int, dtype: torch.dtype) -> int:
    """A random LLaVA with the tiny processor, saved in HF layout; returns its parameter count."""
    from efficientllava.models.tiny import META_FILE, TinyConfig, build_tiny
    from efficientllava.prompting import COMPACT

    shape = SMALL if small else {**SEVEN_B, "text_layers": layers}
    model, processor = build_tiny(TinyConfig(**shape))  # type: ignore[arg-type]
    model.to(dtype).save_pretrained(path)
    processor.save_pretrained(path)
    (path / META_FILE).write_text(json.dumps({"prompt_format": COMPACT}))
    return sum(p.numel() for p in model.parameters())


def _size(nbytes: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of `fn()` (synchronised on CUDA), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def banks_and_materialise(ckpt: Path, device: str, dtype: str, work: Path) -> None:
    """Phases 1 and 2: bank builds and materialise figures, in this process."""
    from efficientllava.config import ModelConfig
    from efficientllava.data import DataConfig
    from efficientllava.pipeline import open_pipeline
    from efficientllava.policy import PruningPolicy
    from efficientllava.pruning.bank import BankSpec, build_bank
    from efficientllava.pruning.materialize import Materializer
    from efficientllava.pruning.units import prunable_units

    pipe = open_pipeline(ModelConfig(spec=str(ckpt), dtype=dtype, device=device), DataConfig(n_shots=16, heldout_size=16),
                         batch_size=8)
    dev = pipe.loaded.device
    units = prunable_units(pipe.model, "sublayer")
    weights = {n: pipe.model.get_submodule(n).weight for u in units for n in u.linears}
    dense_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    say("model", f"{pipe.num_layers} decoder layers, {_size(dense_bytes)} of prunable linears, {dev}, "
                 f"{pipe.loaded.dtype}")
    levels16 = tuple(round(0.05 * i, 2) for i in range(17))
    for method in ("wanda", "sparsegpt"):
        spec = BankSpec("sublayer", tuple((u.name, levels16) for u in units), method)
        _sync(dev)
        t0 = time.perf_counter()
        bank = build_bank(pipe.model, pipe.fewshot_batches, spec, work / f"bank-{method}")
        _sync(dev)
        build_s = time.perf_counter() - t0
        sizes = bank.nbytes()
        if method == "sparsegpt":
            mat = Materializer(pipe.model, bank)
            t0 = time.perf_counter()
            for unit in units[:2]:
                for level in levels16[1:]:
                    mat.prepare(PruningPolicy.from_mapping({unit.name: level}))
            _sync(dev)
            built_s = time.perf_counter() - t0
            built_bytes = sum(weights[n].numel() * weights[n].element_size() for u in units[:2] for n in u.linears)
            say("bank sparsegpt", f"calibration state {_size(sizes['calibration'])} in {build_s:.1f} s; "
                                  f"32 variants of {units[0].name}/{units[1].name} in {built_s:.1f} s; variants "
                                  f"{bank.nbytes()['variants'] / built_bytes:.2f}x their dense bytes at 16 levels "
                                  f"(dense layout: 16x)")
            del mat
        else:
            say(f"bank {method}", f"all 16 levels in {build_s:.1f} s, {_size(sizes['variants'])} = "
                                  f"{sizes['variants'] / dense_bytes:.2f}x the dense linear bytes (dense layout: 16x)")
    bank = build_bank(pipe.model, pipe.fewshot_batches, BankSpec("sublayer", tuple((u.name, LEVELS) for u in units),
                                                                 "wanda"), work / "bank-wanda-4")
    preloaded = bank.preload(dev)
    mat = Materializer(pipe.model, bank)
    policy = PruningPolicy.uniform([u.name for u in units], 0.5)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    apply_s = _timed(lambda: (mat.apply(policy), mat.restore()), dev) - _timed(mat.restore, dev)
    copy_s = _timed(lambda: [w.data.copy_(mat.dense[n]) for n, w in weights.items()], dev)
    with mat.applied(policy):
        zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    exact = all(torch.equal(w, mat.dense[n]) for n, w in weights.items())
    say("materialise", f"uniform 50% (wanda, bank {'on the device' if preloaded else 'read per swap'}): "
                       f"{apply_s * 1e3:.1f} ms vs plain copy {copy_s * 1e3:.1f} ms ({apply_s / copy_s:.1f}x); "
                       f"sparsity while applied {zeros:.4f}; restored bit-exactly: {exact}")
    if dev.type == "cuda":
        say("peak GPU memory", f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB (model + dense copy + bank)")


def semi_structured_latency(device: str, dtype: torch.dtype) -> None:
    """Phase 3: one 11008 x 4096 MLP matrix pruned 2:4, dense vs semi-structured matmul."""
    if not device.startswith("cuda"):
        say("2:4 kernel", "skipped (semi-structured sparse kernels need CUDA)")
        return
    from torch.sparse import to_sparse_semi_structured

    from efficientllava.pruning.methods import prune_weight

    dev = torch.device(device)
    weight = torch.randn(11008, 4096, device=dev, dtype=dtype)
    pruned = prune_weight("magnitude", weight, None, 0.5, "2:4")
    x = torch.randn(2048, 4096, device=dev, dtype=dtype)
    dense_s = _timed(lambda: torch.nn.functional.linear(x, pruned), dev, 20)
    try:
        sparse = to_sparse_semi_structured(pruned)
        sparse_s = _timed(lambda: torch.nn.functional.linear(x, sparse), dev, 20)
        err = float((torch.nn.functional.linear(x, sparse) - torch.nn.functional.linear(x, pruned)).abs().max())
    except (RuntimeError, NotImplementedError) as exc:  # e.g. compute capability < 8.0
        say("2:4 kernel", f"not available on this GPU ({str(exc).splitlines()[0]})")
        return
    say("2:4 kernel", f"11008x4096 @ 2048 tokens, {dtype}: dense {dense_s * 1e3:.3f} ms, semi-structured "
                      f"{sparse_s * 1e3:.3f} ms, speed-up {dense_s / sparse_s:.2f}x (max abs diff {err:.3g})")


def experiment_yaml(work: Path, ckpt: Path, device: str, dtype: str, gpu: float, concurrent: int, small: bool) -> Path:
    """A 2-round, 4-trial experiment with a projector round, on the synthetic task."""
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "smoke", "granularity": "sublayer", "levels": list(LEVELS),
                                     "budget": {"target": 0.5, "tolerance": 0.05}, "method": "wanda"}))  # >= half an MLP level step
    cfg = {"name": f"smoke-gpu{gpu:g}", "model": {"spec": str(ckpt), "dtype": dtype, "device": device},
           "data": {"dataset": "synthetic", "n_shots": 16, "seed": 0, "heldout_size": 16}, "space": str(space),
           "search": {"rounds": 2, "trials_per_round": 4, "max_concurrent": concurrent, "seed": 0,
                      "n_startup_trials": 2},
           "projector": {"enabled": True, "steps": 3 if small else 10, "top_k": 2, "batch_size": 8},
           "resources": {"cpu": 1, "gpu": gpu}, "storage": str(work / "runs"), "eval": {"batch_size": 8}}
    path = work / f"experiment-gpu{gpu:g}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(args: list[str], log: Path, timeout: float) -> float:
    """Run `efficientllava ARGS` (the installed CLI's module) and return its wall time; raise on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "efficientllava.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                              env=os.environ.copy(), timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"efficientllava {' '.join(args)} failed ({proc.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - t0


def search_and_export(ckpt: Path, device: str, dtype: str, work: Path, small: bool, timeout: float) -> None:
    """Phases 4 and 5: searches through the CLI, then export and a plain-transformers reload."""
    from transformers import LlavaForConditionalGeneration

    import efficientllava
    from efficientllava.pruning.units import prunable_units

    runs = [(0.0, 1)] if not device.startswith("cuda") else [(1.0, 1), (0.5, 2)]
    last = None
    for gpu, concurrent in runs:
        cfg = experiment_yaml(work, ckpt, device, dtype, gpu, concurrent, small)
        root = work / f"exp-gpu{gpu:g}"
        wall = cli(["search", str(cfg), "--dir", str(root), "--no-heldout"], work / f"search-gpu{gpu:g}.log", timeout)
        df = efficientllava.load_trials(root)
        done = df[df["status"] == "COMPLETE"]
        say(f"search resources.gpu={gpu:g} max_concurrent={concurrent}",
            f"{len(done)}/{len(df)} trials complete over {df['round'].nunique()} rounds in {wall:.0f} s; best objective "
            f"{done['objective'].max():.4f}; mean eval {done['eval_s'].mean():.2f} s/trial; projector versions "
            f"{sorted(int(v) for v in done['projector_version'].dropna().unique())}")
        last = root
    assert last is not None
    out = work / "export"
    wall = cli(["export", str(last), "--out", str(out)], work / "export.log", timeout)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    linears = [model.get_submodule(n).weight for u in prunable_units(model, "layer") for n in u.linears]
    zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    best = json.loads((last / "best_policy.json").read_text())
    say("export", f"{out} in {wall:.0f} s, reloaded with LlavaForConditionalGeneration.from_pretrained: measured "
                  f"sparsity {zeros:.4f} (best policy's mean {best['mean_sparsity']:.4f})")


def main(argv: list[str] | None = None) -> int:
    """Run every phase and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (plumbing check)")
    ap.add_argument("--small", action="store_true", help="a small model instead of 7B-shaped layers")
    ap.add_argument("--layers", default="auto", help="decoder layers of the 7B-shaped model (auto: as many as fit)")
    ap.add_argument("--out", help="keep the checkpoint, banks and experiments here (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per CLI command")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; nothing to do (use --device cpu --small to check the plumbing)")
        return 0
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="smoke") as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("EFFICIENTLLAVA_HOME", str(work / "home"))
        layers = 0
        if not args.small:
            layers = auto_layers(torch.device(args.device)) if args.layers == "auto" else int(args.layers)
        t0 = time.perf_counter()
        params = build_checkpoint(work / "ckpt", args.small, layers, dtype)
        say("checkpoint", f"{params / 1e6:.1f} M parameters, {'small' if args.small else f'{layers} x (4096, 11008)'}"
                          f" decoder layers, {dtype_name}, saved in {time.perf_counter() - t0:.0f} s")
        banks_and_materialise(work / "ckpt", args.device, dtype_name, work)
        gc.collect()  # free this process's model before the searches load theirs
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        semi_structured_latency(args.device, dtype)
        search_and_export(work / "ckpt", args.device, dtype_name, work, args.small, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
