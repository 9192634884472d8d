"""A search on a 2-node Ray cluster on this machine whose worker node cannot see the experiment directory.

The head (`--num-cpus 0`: no evaluation worker fits there) runs in this test's mount namespace; the
worker node is started inside `unshare --mount` with an empty tmpfs over the experiment directory's
parent, so anything a worker read from or wrote to the experiment directory would be missing or lost.
The search completes; a second search is SIGKILLed mid-round and resumed with no trial lost or repeated.
Every process is found through the two private temp dirs and killed at the end (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import check_resumed, unfinished_trials
from rayprocs import kill_ray, ray_processes
from test_job_submit import free_ports

from efficientllava import load_trials

pytestmark = pytest.mark.slow
TRIALS = 6
SPACE = {"params": {f"x_{i}": [0, 99] for i in range(6)}, "target": 30, "sleep_s": 0.6}


def ray_cli(args: list[str], env: dict[str, str], timeout: float, prefix: list[str] | None = None) -> str:
    """Run `ray ARGS` (optionally under `prefix`, e.g. unshare) in its own session; its output, or a test failure."""
    cmd = [*(prefix or []), sys.executable, "-m", "ray.scripts.scripts", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          timeout=timeout, start_new_session=True)
    assert proc.returncode == 0, f"`ray {' '.join(args[:2])}` failed:\n{proc.stdout[-5000:]}"
    return proc.stdout


def search(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`efficientllava ARGS` against the cluster at RAY_ADDRESS, in its own session."""
    return subprocess.Popen([sys.executable, "-m", "efficientllava.cli", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def worker_node_sees(pid: int, path: Path) -> list[str]:
    """What the worker node's mount namespace shows at `path` (entered through one of its processes)."""
    out = subprocess.run(["nsenter", "--target", str(pid), "--mount", "--", "ls", "-A", str(path)],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.split() if out.returncode == 0 else [f"<{out.stderr.strip()}>"]


def test_search_on_two_nodes_without_a_shared_filesystem(tmp_path):
    if not (shutil.which("unshare") and shutil.which("nsenter")) or os.geteuid() != 0:
        pytest.skip("needs unshare/nsenter and root to give the worker node its own mount namespace")
    base = tmp_path / "driver-only"  # the experiments' parent: an empty tmpfs on the worker node
    base.mkdir()
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "two-nodes", "problem": "efficientllava.testing.toy:QuadraticProblem", "space": str(tmp_path / "space.yaml"),
        "search": {"rounds": 2, "trials_per_round": TRIALS, "max_concurrent": 2, "n_startup_trials": TRIALS},
    }))
    head_tmp, node_tmp = (tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("elh", "elw"))  # short: socket paths
    gcs, *ports = free_ports(8)
    # Both nodes advertise this machine's address (multi-node mode rewrites 127.0.0.1 to it), so their
    # traffic never leaves the machine; a token of our own for the head, the node and the searches.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(var, None)
    try:
        ray_cli(["start", "--head", f"--port={gcs}", "--num-cpus=0",
                 "--include-dashboard=false", f"--temp-dir={head_tmp}", f"--dashboard-agent-listen-port={ports[0]}",
                 f"--dashboard-agent-grpc-port={ports[1]}", f"--runtime-env-agent-port={ports[2]}",
                 f"--ray-client-server-port={ports[3]}", "--disable-usage-stats"], env, timeout=180)
        hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mount -t tmpfs efficientllava-test {base} && exec \"$@\"", "sh"]
        ray_cli(["start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                 f"--temp-dir={node_tmp}", f"--dashboard-agent-listen-port={ports[4]}",
                 f"--dashboard-agent-grpc-port={ports[5]}", f"--runtime-env-agent-port={ports[6]}",
                 "--disable-usage-stats"], env, timeout=180, prefix=hide)
        node_pid = ray_processes(node_tmp)[0]
        assert worker_node_sees(node_pid, base) == [], "the worker node must not see the experiments"
        env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"

        # 1. A whole search: the worker node evaluates every trial, the driver writes every record.
        first = base / "first"
        proc = search(["search", str(config), "--dir", str(first), "--no-heldout"], env, tmp_path / "first.log")
        assert proc.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-5000:]
        df = load_trials(first)
        assert len(df) == 2 * TRIALS and (df["status"] == "COMPLETE").all()
        assert json.loads((first / "state.json").read_text())["status"] == "done"
        nodes = {i["node_id"] for p in (first / "rounds").glob("round-*/workers-*.json")
                 for i in json.loads(p.read_text())}
        assert len(nodes) == 1 and set(df["worker"]) == {"w0", "w1"}
        assert "joined the Ray cluster" in (tmp_path / "first.log").read_text()
        assert worker_node_sees(node_pid, base) == [], "nothing was written where the worker node cannot share"

        # 2. A second search, SIGKILLed mid round 0, then resumed on the same cluster.
        second = base / "second"
        proc = search(["search", str(config), "--dir", str(second), "--no-heldout"], env, tmp_path / "second.log")
        deadline = time.time() + 240
        while len(list((second / "trials").glob("0-*.json"))) < 2:
            assert proc.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
            assert time.time() < deadline, (tmp_path / "second.log").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        before = {p.name: p.read_bytes() for p in (second / "trials").glob("*.json")}
        assert 2 <= len(before) < TRIALS, sorted(before)
        unfinished = unfinished_trials(second, before)
        resumed = search(["resume", str(second), "--no-heldout"], env, tmp_path / "resume.log")
        assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-5000:]
        check_resumed(second, before, unfinished, rounds=2, trials=TRIALS)
        assert "resuming with" in (tmp_path / "resume.log").read_text()
        assert worker_node_sees(node_pid, base) == []
    finally:
        for marker in (node_tmp, head_tmp):
            kill_ray(marker)
            shutil.rmtree(marker, ignore_errors=True)
    assert not ray_processes(head_tmp) and not ray_processes(node_tmp)
