"""The jobs/ entrypoints through a real `ray start --head` + `ray job submit` (token auth included)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

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


@pytest.fixture(scope="module")
def head_address():
    TOKEN_FILE.write_text(secrets.token_hex(32))
    gcs_port, dashboard_port = free_port(), free_port()
    start = subprocess.run(
        [RAY, "start", "--head", "--num-cpus=4", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
         "--include-dashboard=true", "--disable-usage-stats"],
        env=ENV, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)


def submit(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", *args],
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


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
