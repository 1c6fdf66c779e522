"""The documented ways to start serving, as a user runs them: `fastserve-ray serve` and `serve run YAML`.

Each starts its own private Ray in a subprocess, answers one completion over real HTTP, and
shuts down cleanly on Ctrl-C (SIGINT), leaving the port free again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from serve_helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# No RAY_ADDRESS: each command starts (and stops) its own Ray, as on a laptop.
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
ENV["PATH"] = f"{BIN}{os.pathsep}{ENV.get('PATH', '')}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def completes(url: str, body: dict) -> bool:
    try:
        return httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    except httpx.HTTPError:
        return False


def serve_until_ctrl_c(cmd: list[str], port: int, model: str, log: Path, ready_line: str,
                       poll_until_served: bool = False) -> str:
    """Start ``cmd``; once it prints ``ready_line``, complete one prompt over HTTP, send SIGINT."""
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        # Its own process group, so the SIGINT reaches exactly what the test started.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        # As a user would: wait until the command says it is serving, then use it.
        wait_for(lambda: proc.poll() is not None or ready_line in log.read_text(), 240,
                 f"{cmd[0]} to print {ready_line!r}")
        assert proc.poll() is None, log.read_text()[-3000:]
        body = {"model": model, "prompt": "The for statement", "max_tokens": 4, "temperature": 0}
        if poll_until_served:  # `serve run CONFIG` submits the app and returns before it is up
            wait_for(lambda: completes(url, body), 240, "the served model to answer")
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == model and out["usage"]["completion_tokens"] == 4
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wait_for(lambda: not port_is_listening(port), 60, f"port {port} to be released")
    return log.read_text()


@pytest.mark.slow
def test_fastserve_ray_serve_command_serves_then_stops_on_ctrl_c(tiny_model_dir, tmp_path):
    port = free_port()
    output = serve_until_ctrl_c(
        [str(BIN / "fastserve-ray"), "serve", "--model", f"tiny={tiny_model_dir}", "--port", str(port)],
        port, "tiny", tmp_path / "serve.log", ready_line="Ctrl-C to stop")
    assert f"serving tiny at http://127.0.0.1:{port}/v1" in output
    assert "shutting down Serve" in output


@pytest.mark.slow
def test_serve_run_of_the_shipped_yaml(tiny_model_dir, tmp_path):
    # The shipped file as a user adapts it: their model directory, a port of their choice.
    config = yaml.safe_load((ROOT / "deployments" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app_args = config["applications"][0]["args"]
    app_args["models"][0]["path"] = str(tiny_model_dir)
    app_args["http"]["port"] = port
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    served_name = app_args["models"][0]["name"]
    serve_until_ctrl_c([str(BIN / "serve"), "run", str(path)], port, served_name, tmp_path / "run.log",
                       ready_line="Submitted deploy config successfully", poll_until_served=True)
