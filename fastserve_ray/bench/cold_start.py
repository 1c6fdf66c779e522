"""Cold starts: a model at zero replicas, one request, the time to its first token, and where it went.

For each preset and each source of the model directory (a local path, and ``s3://`` on a local
S3 server when moto is installed), one Serve application with ``min_replicas: 0`` is deployed at
zero replicas. Each repetition waits until the deployment is back at zero, clears this node's
model cache (so an s3:// start downloads, as the first replica on a fresh node would), sends one
streamed completion and times arrival -> first token (``cold_start_s``). The replica reports its
own phases in ``GET /v1/models/{id}`` (``startup_s``: download, engine-process imports, model load,
engine build, the replica's whole __init__); what is left of ``cold_start_s`` is Serve's part
(noticing the queued request, starting the worker process, importing our code) plus the first
request itself. A warm request right after gives the TTFT a running replica has, for contrast.
Sources alternate within each repetition; medians and spreads over the repetitions.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fastserve_ray.bench.report import print_table, write_json

TARGET_COLD_START_S = 15.0  # `bench` preset from S3 on a 2-core CPU machine (issue goal)
AUTOSCALING = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "upscale_delay_s": 0.5,
               "downscale_delay_s": 1.0, "downscale_to_zero_delay_s": 1.0, "metrics_interval_s": 0.5,
               "look_back_period_s": 1.0}


def _replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


def _wait_until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.25)


def _first_token_s(url: str, name: str) -> tuple[float, int]:
    """Seconds from sending a streamed completion to its first token, and the HTTP status."""
    import httpx

    t0 = time.perf_counter()
    body = {"model": name, "prompt": "a cold start", "max_tokens": 8, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        first = None
        for line in r.iter_lines():
            if first is None and line.startswith("data: ") and '"text"' in line:
                first = time.perf_counter() - t0
        return (first if first is not None else float("nan")), r.status_code


def _one_start(url: str, app: str, deployment: str, name: str, cache: Path) -> dict[str, Any]:
    import httpx

    _wait_until(lambda: _replicas(app, deployment) == 0, 120, f"{app} at zero replicas")
    shutil.rmtree(cache, ignore_errors=True)  # a fresh node: s3:// models download again
    cold, status = _first_token_s(url, name)
    warm, _ = _first_token_s(url, name)
    card = httpx.get(f"{url}/v1/models/{name}", timeout=60).json()
    phases = card.get("startup_s", {})
    return {"cold_start_s": cold, "warm_ttft_s": warm, "status": status, "phases_s": phases,
            "serve_and_first_request_s": cold - phases.get("replica_init_s", 0.0)}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    cold = [r["cold_start_s"] for r in runs]
    phases = sorted({k for r in runs for k in r["phases_s"]})
    return {"cold_start_s": statistics.median(cold), "cold_start_min_s": min(cold),
            "cold_start_max_s": max(cold),
            "warm_ttft_s": statistics.median(r["warm_ttft_s"] for r in runs),
            "serve_and_first_request_s": statistics.median(r["serve_and_first_request_s"] for r in runs),
            "phases_s": {k: statistics.median(r["phases_s"].get(k, 0.0) for r in runs) for k in phases},
            "failed": sum(r["status"] != 200 for r in runs), "runs": runs}


def _model_dir(preset: str, work: Path) -> Path:
    import torch

    from fastserve_ray.data import builtin_documents
    from fastserve_ray.models import build_model, get_preset, save_model_dir
    from fastserve_ray.tokenizer import train_tokenizer

    cfg = get_preset(preset)
    tokenizer = train_tokenizer((d.text for d in builtin_documents("docs")), vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    return Path(save_model_dir(work / preset, build_model(cfg), tokenizer))


def run_cold_start_bench(out: Path | None = None, presets: tuple[str, ...] = ("small", "bench"),
                         reps: int = 3) -> dict[str, Any]:
    """Cold start to first token per preset and source (see the module doc); JSON to ``out``."""
    import ray
    from ray import serve

    from fastserve_ray.models.model_store import CACHE_ENV
    from fastserve_ray.serve.builder import server_deployment_name
    from fastserve_ray.serve.command import deploy, free_port
    from fastserve_ray.serve.config import ServeConfig

    work = Path(tempfile.mkdtemp(prefix="bench-cold-start-"))
    cache = work / "node-cache"
    os.environ[CACHE_ENV] = str(cache)  # before Ray starts: the replicas inherit it
    s3 = _start_s3()
    sources = ["local"] + (["s3"] if s3["server"] is not None else [])
    results: dict[str, Any] = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        for preset in presets:
            local = _model_dir(preset, work)
            paths = {"local": str(local)}
            if "s3" in sources:
                from fastserve_ray.models import load_model_dir, save_model_dir

                loaded = load_model_dir(local)
                paths["s3"] = f"s3://bench/{preset}"
                save_model_dir(paths["s3"], loaded.model, loaded.tokenizer, overwrite=True)
            size_mb = sum(f.stat().st_size for f in local.iterdir()) / 1e6
            urls = {}
            for source in sources:
                app = f"cold-{preset}-{source}"
                cfg = ServeConfig.from_dict({
                    "models": [{"path": paths[source], "name": app, "autoscaling": AUTOSCALING}],
                    "http": {"port": port}, "app_name": app, "route_prefix": f"/{app}"})
                urls[source] = deploy(cfg, log_level="WARNING")
            runs: dict[str, list] = {s: [] for s in sources}
            for rep in range(reps):
                for source in sources:  # interleaved: the same machine state for both
                    app = f"cold-{preset}-{source}"
                    r = _one_start(urls[source], app, server_deployment_name(app), app, cache)
                    runs[source].append(r)
                    print(f"[bench cold-start] {preset} from {source}, rep {rep + 1}/{reps}: "
                          f"first token after {r['cold_start_s']:.2f}s "
                          f"(warm {r['warm_ttft_s'] * 1e3:.0f} ms)", flush=True)
            results[preset] = {"model_mb": size_mb, **{s: _summary(runs[s]) for s in sources}}
            for source in sources:
                serve.delete(f"cold-{preset}-{source}")
    finally:
        serve.shutdown()
        ray.shutdown()
        if s3["server"] is not None:
            s3["server"].stop()
        shutil.rmtree(work, ignore_errors=True)
    from fastserve_ray.capability import capability

    report = {"cold_start": results, "s3": "a local moto S3 server on 127.0.0.1" if "s3" in sources
              else f"not measured: {s3['error']}", "target_bench_s3_s": TARGET_COLD_START_S,
              "config": {"presets": list(presets), "reps": reps, "autoscaling": AUTOSCALING,
                         "cpus": os.cpu_count(), "platform": platform.platform(),
                         "capability": capability().as_dict()}}
    _print(report)
    write_json(report, out, "cold-start")
    return report


def _start_s3() -> dict[str, Any]:
    """moto's S3 server on 127.0.0.1 (a test extra); the AWS_* variables point at it."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        return {"server": None, "error": f"moto is not installed ({e}); pip install '.[test]'"}
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server._server.server_port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3").create_bucket(Bucket="bench")
    return {"server": server, "error": None}


def _print(report: dict[str, Any]) -> None:
    rows = []
    for preset, r in report["cold_start"].items():
        for source, s in r.items():
            if source == "model_mb":
                continue
            p = s["phases_s"]
            rows.append((f"{preset} ({r['model_mb']:.0f} MB) from {source}",
                         f"{s['cold_start_s']:.2f} ({s['cold_start_min_s']:.2f}-{s['cold_start_max_s']:.2f})",
                         f"{p.get('download_s', 0):.2f}", f"{p.get('engine_process_s', 0):.2f}",
                         f"{p.get('load_model_s', 0):.2f}", f"{p.get('build_engine_s', 0):.2f}",
                         f"{p.get('replica_init_s', 0):.2f}", f"{s['serve_and_first_request_s']:.2f}",
                         f"{s['warm_ttft_s'] * 1e3:.0f}", str(s["failed"])))
    print_table(("model and source", "cold start s", "download", "engine process", "load", "engine build",
                 "replica init", "Serve + request", "warm TTFT ms", "failed"), rows)
    print(json.dumps({"s3": report["s3"]}))
