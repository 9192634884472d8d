"""`ray job submit` of `efficientllava search` to a local Ray head on loopback (the README's cluster path).

The head gets its own temp dir, ports and auth token; every process of it is killed at the end
(never `ray stop`, which would stop other people's Ray clusters on this machine too).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from rayprocs import kill_ray, ray_processes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRIALS = 4
# Never uploaded with --working-dir (Ray also skips what .gitignore lists); keeps the package small.
EXCLUDES = [".git", "runs", ".cache", ".venv", "build", "*.egg-info", ".mypy_cache", ".pytest_cache",
            ".ruff_cache", "__pycache__"]
MAX_UPLOAD_BYTES = 10 * 2**20
# On a fresh machine the job's search also trains the tiny model once (~3 min); cached, it takes ~1 min.
JOB_TIMEOUT_S = 540


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that are free right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run the `ray` CLI of this interpreter (its own session), stdout and stderr together."""
    proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"`ray {args[0]} {args[1]}` ran past {timeout}s:\n{out[-5000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def jobs_api_missing() -> str | None:
    """Why this Ray installation cannot run the Jobs API (it needs the dashboard: ray[default]), or None."""
    check = subprocess.run([sys.executable, "-c", "import ray.dashboard.optional_deps"],
                           capture_output=True, text=True, timeout=120)
    if check.returncode == 0:
        return None
    lines = check.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {check.returncode}"


def write_config(tmp_path: Path) -> Path:
    """experiments/tiny.yaml reduced to 1 round x 4 trials; absolute space path, storage under tmp_path."""
    cfg = yaml.safe_load((REPO / "experiments" / "tiny.yaml").read_text())
    cfg["space"] = str(REPO / "search_spaces" / "tiny.yaml")
    cfg["search"].update(rounds=1, trials_per_round=TRIALS, max_concurrent=2)
    cfg["storage"] = str(tmp_path / "runs")
    path = tmp_path / "tiny-job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_ray_job_submit_runs_a_search_on_the_cluster(tmp_path):
    from efficientllava import load_trials

    missing = jobs_api_missing()
    if missing:
        pytest.skip(f"`ray job submit` needs the Ray dashboard, which this Ray installation cannot start "
                    f"({missing}); install `ray[default]` to run this test")
    assert shutil.which("efficientllava"), "the `efficientllava` command is not on PATH (pip install -e .)"
    config = write_config(tmp_path)
    exp_dir = tmp_path / "exp"
    marker = tempfile.mkdtemp(prefix="elj", dir="/tmp")  # short: Ray's unix socket paths live under it
    gcs, dashboard, client, agent = free_ports(4)
    address = f"http://127.0.0.1:{dashboard}"
    env = {**os.environ, "RAY_TMPDIR": marker,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray keeps 127.0.0.1 as the node address, not eth0's
           # A token of our own (head, CLI and the job): no dependence on, or change to, ~/.ray/auth_token.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    submission = f"efficientllava-{secrets.token_hex(4)}"
    try:
        t0 = time.time()
        head = ray(["start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                    f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", "--include-dashboard=true",
                    f"--temp-dir={marker}", "--disable-usage-stats"], env, timeout=180)
        assert head.returncode == 0, head.stdout[-5000:]
        start_s = time.time() - t0

        submit = ray(["job", "submit", "--address", address, "--submission-id", submission,
                      "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                      "--", "efficientllava", "search", str(config), "--dir", str(exp_dir), "--no-heldout"],
                     env, timeout=JOB_TIMEOUT_S)
        (tmp_path / "job.log").write_text(submit.stdout)
        assert submit.returncode == 0, submit.stdout[-6000:]
        job_s = time.time() - t0 - start_s
        status = ray(["job", "status", "--address", address, submission], env, timeout=60)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout)  # the CLI colours its words
        assert status.returncode == 0 and f"Job '{submission}' succeeded" in plain, plain[-3000:]

        # The search inside the job joined the cluster it was submitted to (init_ray reads RAY_ADDRESS)
        # rather than starting a Ray of its own.
        assert f"[efficientllava] joined the Ray cluster at 127.0.0.1:{gcs}" in submit.stdout, submit.stdout[-6000:]
        assert "Started a local Ray instance" not in submit.stdout
        assert f"[efficientllava] experiment directory: {exp_dir}" in submit.stdout

        # The uploaded working dir is the package, small, without runs or caches.
        packages = list(Path(marker).glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*"))
        packages = [p for p in packages if p.is_dir()]
        assert len(packages) == 1, packages
        uploaded = [p for p in packages[0].rglob("*") if p.is_file()]
        assert (packages[0] / "efficientllava" / "cli.py").is_file()
        assert sum(p.stat().st_size for p in uploaded) < MAX_UPLOAD_BYTES
        assert not {"runs", ".git", ".mypy_cache"} & {p.relative_to(packages[0]).parts[0] for p in uploaded}

        # The experiment the job wrote: 4 finished trials of round 0 and a finished search.
        df = load_trials(exp_dir)
        assert len(df) == TRIALS and (df["status"] == "COMPLETE").all()
        assert sorted(df["number"]) == list(range(TRIALS)) and set(df["round"]) == {0}
        assert df["objective"].notna().all()
        state = json.loads((exp_dir / "state.json").read_text())
        assert state["status"] == "done"
        assert (exp_dir / "best_policy.json").is_file() and (exp_dir / "report" / "report.html").is_file()
        assert not (exp_dir / "heldout.json").exists()  # --no-heldout
        print(f"ray start {start_s:.0f}s, job {job_s:.0f}s")
        assert kill_ray(marker), "no process of the head was found under its temp dir: the clean-up is blind"
    finally:
        kill_ray(marker)  # this head only; `ray stop` would also stop other Ray clusters of the user
        shutil.rmtree(marker, ignore_errors=True)
    assert not ray_processes(marker)
