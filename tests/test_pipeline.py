"""The pipeline job end to end on a real local Ray: one uninterrupted run (deployed, smoke-tested,
lineage on GET /v1/models/{id}), and one whose driver is SIGKILLed mid-train and then mid-compress:
each rerun skips the finished stages (outputs untouched) and the result matches the first run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from fastserve_ray.errors import ConfigError
from fastserve_ray.models import load_model_dir
from fastserve_ray.pipeline.config import PipelineConfig
from fastserve_ray.pipeline.runner import run_pipeline_job
from fastserve_ray.serve.command import free_port
from fastserve_ray.serve.demo_step import serve_and_query

ROOT = Path(__file__).resolve().parents[1]
# A tiny model trained slowly enough (step_delay_s) that a kill can land between checkpoints.
CONFIG = {
    "data": {"vocab_size": 512, "seq_len": 64},
    "train": {"preset": "tiny", "num_workers": 1, "global_batch_size": 8, "micro_batch_size": 8,
              "max_steps": 40, "warmup_steps": 2, "log_interval": 10, "eval_interval": 20,
              "checkpoint_interval": 10, "eval_rows": 16, "step_delay_s": 0.08},
    "compress": ["int8"],
    "evaluate": {"max_rows": 16},
    "smoke": {"prompts": ["def f"], "max_tokens": 4},
}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run, in this process, deployed on its own app."""
    out = tmp_path_factory.mktemp("reference") / "out"
    cfg = PipelineConfig.from_dict({**CONFIG, "out": str(out), "deploy": {
        "model": "int8", "name": "tiny", "port": free_port(),
        "serve": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}}}})
    return run_pipeline_job(cfg)


def _driver(config: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "fastserve_ray.cli", "pipeline", "--config", str(config)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout_s: float = 240) -> list[str]:
    """Read the driver's output until ``ready(lines)``; then SIGKILL its process group."""
    lines: list[str] = []
    deadline = time.time() + timeout_s
    os.set_blocking(proc.stdout.fileno(), False)
    while not ready(lines):
        assert time.time() < deadline, f"no {what} within {timeout_s:.0f}s: {lines[-20:]}"
        assert proc.poll() is None, f"the driver ended before {what}: {lines[-20:]}"
        chunk = proc.stdout.readline()
        if chunk:
            lines.append(chunk.rstrip())
        else:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return lines


def _finish(config: Path) -> list[str]:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    run = subprocess.run([sys.executable, "-m", "fastserve_ray.cli", "pipeline", "--config", str(config)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [ln for ln in run.stdout.splitlines() if ln.startswith("[pipeline]")]


def _params(model_dir: Path) -> dict:
    return load_model_dir(model_dir).model.state_dict()


def test_the_uninterrupted_run_serves_its_artifact_with_its_lineage(reference) -> None:
    dep = reference["outputs"]["deploy"]
    card = httpx.get(f"{dep['url']}/v1/models/tiny", timeout=30).json()
    lineage = card["lineage"]
    data_sha = reference["outputs"]["prepare"]["data_manifest_sha256"]
    assert lineage["data"]["manifest_sha256"] == data_sha
    assert lineage["training"]["final_step"] == CONFIG["train"]["max_steps"]
    assert lineage["compression"]["recipe"] == "int8"
    assert lineage["evaluation"]["data_manifest_sha256"] == data_sha
    evaluated = reference["outputs"]["evaluate"]["results"]["int8"]
    assert lineage["evaluation"]["perplexity"] == evaluated["perplexity"]
    assert reference["outputs"]["smoke"]["answers"][0]["prompt"] == "def f"


def test_the_demo_step_leaves_other_serve_apps_running(reference, tiny_model_dir) -> None:
    app = reference["outputs"]["deploy"]["app_name"]
    serve_and_query(tiny_model_dir, "hello", max_tokens=2)
    assert serve.status().applications[app].status == "RUNNING"  # it used to call serve.shutdown()


def test_a_killed_driver_resumes_at_the_unfinished_stage(reference, tmp_path) -> None:
    out = tmp_path / "out"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "out": str(out), "deploy": {"enabled": False}}))

    # 1. Killed mid-train, once Ray Train has committed a checkpoint.
    snapshot = out / "run" / "checkpoints" / "pipeline" / "checkpoint_manager_snapshot.json"
    _kill_when(_driver(config, out),
               lambda _: snapshot.exists() and "checkpoint_" in snapshot.read_text(), "a checkpoint")
    assert not (out / "pipeline" / "train.json").exists() and (out / "pipeline" / "prepare.json").exists()
    data_manifest = out / "data" / "data_manifest.json"
    data_mtime = data_manifest.stat().st_mtime_ns

    # 2. The rerun skips prepare, resumes training; killed again once compression started.
    lines = _kill_when(_driver(config, out), lambda ls: any("compress-int8: running" in ln for ln in ls),
                       "the compress stage")
    assert any("prepare: done before, output verified - skipped" in ln for ln in lines), lines
    assert data_manifest.stat().st_mtime_ns == data_mtime
    assert not (out / "pipeline" / "compress-int8.json").exists()
    weights = out / "run" / "model" / "model.safetensors"
    weights_mtime = weights.stat().st_mtime_ns
    files = load_model_dir(out / "run" / "model").manifest["files"]

    # 3. The last rerun skips prepare and train, compresses, evaluates.
    lines = _finish(config)
    assert [ln.split(": ")[1] for ln in lines if ": running" in ln or "skipped" in ln] == [
        "done before, output verified - skipped", "done before, output verified - skipped",
        "running (no record)", "running (no record)"], lines
    # Untouched: the data, the trained weights (the evaluate stage only adds its figures to lineage).
    assert data_manifest.stat().st_mtime_ns == data_mtime and weights.stat().st_mtime_ns == weights_mtime
    assert load_model_dir(out / "run" / "model").manifest["files"] == files
    lineage = load_model_dir(out / "run" / "model").manifest["lineage"]["training"]
    assert lineage["resumes"], "the second driver should have resumed from a checkpoint"

    # The result matches the uninterrupted run's: training resumes exactly up to float noise.
    ref = Path(reference["out"])
    a, b = _params(ref / "run" / "model"), _params(out / "run" / "model")
    worst = max(float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)) for k in a)
    assert worst <= 1e-5, worst
    ppl = json.loads((out / "eval.json").read_text())["int8"]["perplexity"]
    ref_ppl = reference["outputs"]["evaluate"]["results"]["int8"]["perplexity"]
    assert abs(ppl - ref_ppl) / ref_ppl <= 1e-4, (ppl, ref_ppl)


def test_bad_pipeline_configs_name_the_field() -> None:
    with pytest.raises(ConfigError, match="deploy.model: 'int4' is neither"):
        PipelineConfig.from_dict({"out": "x", "deploy": {"model": "int4"}})
    with pytest.raises(ConfigError, match="train"):
        PipelineConfig.from_dict({"out": "x", "train": {"max_stepz": 3}})
    with pytest.raises(ConfigError, match="compres"):
        PipelineConfig.from_dict({"out": "x", "compres": ["int8"]})
