"""The scale and GPU-smoke benchmarks run end to end on small CPU shapes (their plumbing, not their figures)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpu_smoke_without_cuda_says_so_in_one_line(capsys):
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "benchmarks" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert smoke.main([]) == 0
    out = capsys.readouterr().out
    assert out.strip().count("\n") == 0 and "no CUDA" in out


@pytest.mark.slow  # starts Ray for a 2-round search
def test_gpu_smoke_plumbing_on_cpu(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths
    proc = _run(["benchmarks/gpu_smoke.py", "--device", "cpu", "--small", "--out", str(tmp_path)], 900,
                {"RAY_TMPDIR": ray_tmp, "EFFICIENTLLAVA_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^\[smoke\] (.+?): (.*)$", proc.stdout, re.M)}
    for key in ("checkpoint", "model", "bank wanda", "bank sparsegpt", "materialise", "2:4 kernel",
                "search resources.gpu=0 max_concurrent=1", "export"):
        assert key in lines, (key, proc.stdout[-3000:])
    assert "restored bit-exactly: True" in lines["materialise"]
    assert "skipped" in lines["2:4 kernel"]
    assert lines["search resources.gpu=0 max_concurrent=1"].startswith("8/8 trials complete over 2 rounds")
    assert "projector versions [0, 1]" in lines["search resources.gpu=0 max_concurrent=1"]
    measured, mean = map(float, re.search(r"measured sparsity ([\d.]+) \(best policy's mean ([\d.]+)\)",
                                          lines["export"]).groups())
    assert abs(measured - mean) <= 1 / 64 + 1e-6 and mean > 0.4  # Wanda: floor(s * in) per row, in = 64


@pytest.mark.slow  # builds every method's bank in its own process
def test_scale_benchmark_prints_both_tables():
    proc = _run(["benchmarks/scale.py", "--hidden", "64", "--intermediate", "128", "--layers", "1", "--samples", "2",
                 "--seq", "16", "--batch", "2", "--threads", "1", "--methods", "magnitude,sparsegpt", "--markdown"],
                600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| magnitude | nested-mask |" in out and "| sparsegpt | compact |" in out
    assert "| LLaVA-1.5-7B | magnitude |" in out and "| LLaVA-1.5-13B | sparsegpt |" in out
    assert "nested-mask targets: bank <= 1.0x dense" in out and "sparsegpt target" in out
