"""The jobs/ entrypoints through a real `ray start --head` + `ray job submit` (token auth included)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
# As a user with the venv activated: the head's job drivers run this environment's `python`.
# Token auth on, with a token made for this test: it works whether or not ~/.ray/auth_token exists.
TOKEN_FILE = Path(tempfile.mkdtemp(prefix="ray-token-")) / "auth_token"
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
       "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(TOKEN_FILE)}
ENV.pop("RAY_ADDRESS", None)
ENV.pop("RAY_AUTH_TOKEN", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(temp_dir: str) -> None:
    """Stop the processes of the head this module started, and only those.

    `ray stop` would kill every Ray process on the machine, including the clusters other test
    modules run at the same time; every process of this head names its own --temp-dir.
    """
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and temp_dir in " ".join(p.info["cmdline"] or []):
            procs.append(p)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    # A few seconds is enough for the GCS and raylets to exit cleanly; one that has not by then
    # is killed (waiting 15 s for a stuck one made this the slowest teardown of the suite).
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.fixture(scope="module")
def head_address():
    TOKEN_FILE.write_text(secrets.token_hex(32))
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayjs-")  # short: Ray's socket paths live under it
    try:
        start = subprocess.run(
            [RAY, "start", "--head", "--num-cpus=4", f"--port={gcs_port}",
             f"--dashboard-port={dashboard_port}", "--include-dashboard=true", "--disable-usage-stats",
             f"--temp-dir={temp_dir}",
             # Ray's fixed default ports (the agent's 52365 among them) may be held by another
             # module's Ray on this machine; the job agent would then never register.
             *(f"--{name}={free_port()}" for name in (
                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port"))],
            env=ENV, capture_output=True, text=True, timeout=180,
        )
        assert start.returncode == 0, start.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent has not registered yet (Ray answers
    500 "No available agent to submit job, please try again later" for the first seconds)."""
    deadline = time.monotonic() + 90
    while True:
        proc = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", *args],
            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(2)


def test_prepare_and_train_as_ray_jobs(head_address, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    proc = submit(head_address, "jobs/prepare_data.py", "--out", str(data), "--vocab-size", "400",
                  "--seq-len", "32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    proc = submit(head_address, "jobs/train.py", "--data", str(data), "--out", str(run), "--preset", "tiny",
                  "--num-workers", "2", "--max-steps", "4", "--global-batch-size", "8",
                  "--micro-batch-size", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained 4 steps" in proc.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4 and metrics[-1]["num_workers"] == 2
    assert (run / "model" / "manifest.json").is_file()


def test_failed_job_reports_the_error(head_address, tmp_path):
    proc = submit(head_address, "jobs/train.py", "--data", str(tmp_path / "missing"), "--out",
                  str(tmp_path / "run"))
    assert proc.returncode != 0
    assert "does not exist" in proc.stdout + proc.stderr
