"""Scale to zero and back: an idle model drops to 0 replicas, the next burst waits at the router
while a replica starts, and every request of the burst is answered (no 5xx, no 503)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from serve_helpers import running_replicas, wait_for

from fastserve_ray.serve.builder import server_deployment_name
from fastserve_ray.serve.command import deploy, free_port
from fastserve_ray.serve.config import ServeConfig

DEPLOYMENT = server_deployment_name("tiny")
AUTOSCALING = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 1, "upscale_delay_s": 0.5,
               "downscale_delay_s": 2.0, "downscale_to_zero_delay_s": 2.0, "metrics_interval_s": 0.5,
               "look_back_period_s": 1.0}


@pytest.fixture(scope="module")
def apps(tiny_model_dir: Path):
    """One Serve, two apps: the router front and the direct one, both allowed to reach zero."""
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    port = free_port()
    urls = {}
    # "limited": a router wait far shorter than any cold start, to see the limit answer.
    for app, ingress, wait in (("router", "router", 300.0), ("direct", "direct", 300.0),
                               ("limited", "router", 0.5)):
        cfg = ServeConfig.from_dict({"models": [{
            "path": str(tiny_model_dir), "name": "tiny", "engine": {"max_num_seqs": 4},
            "max_router_wait_s": wait, "autoscaling": AUTOSCALING | {"initial_replicas": 0}},
        ], "http": {"port": port}, "ingress": ingress, "app_name": f"zero-{app}", "route_prefix": f"/{app}"})
        urls[app] = deploy(cfg, log_level="WARNING")
    yield urls
    serve.shutdown()
    ray.shutdown()


def _burst(url: str, n: int) -> list[tuple[int, float]]:
    """``n`` concurrent completions; (status, seconds to the answer) each."""
    out: list[tuple[int, float]] = []

    def one(i: int) -> None:
        t0 = time.monotonic()
        try:
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": f"after idle {i}", "max_tokens": 4, "ignore_eos": True})
            out.append((r.status_code, time.monotonic() - t0))
        except httpx.HTTPError:
            out.append((0, time.monotonic() - t0))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    return out


@pytest.mark.parametrize("ingress", ["router", "direct"])
def test_idle_to_zero_then_a_burst_is_answered_twice(apps, ingress: str) -> None:
    app = f"zero-{ingress}"
    url = apps[ingress]
    for cycle in (1, 2):  # deployed at zero; then the first burst's replica idles away
        wait_for(lambda: running_replicas(app, DEPLOYMENT) == 0, 90, f"scale-down to zero ({cycle})")
        results = _burst(url, 6)
        statuses = sorted(s for s, _ in results)
        slowest = max(t for _, t in results)
        print(f"\n{ingress} cycle {cycle}: burst at zero replicas -> {statuses}, slowest {slowest:.1f}s")
        assert statuses == [200] * 6
        assert running_replicas(app, DEPLOYMENT) == 1
    # The replica says where its start went (what `bench serve --only cold-start` reports).
    phases = httpx.get(f"{url}/v1/models/tiny", timeout=30).json()["startup_s"]
    assert {"download_s", "load_model_s", "build_engine_s", "replica_init_s"} <= set(phases), phases
    assert 0 < phases["load_model_s"] < phases["replica_init_s"] < slowest


def test_past_the_router_wait_limit_the_answer_is_a_503_naming_it(apps) -> None:
    assert running_replicas("zero-limited", DEPLOYMENT) == 0
    r = httpx.post(f"{apps['limited']}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "too soon", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert err["code"] == "no_replica" and "within 0.5 s" in err["message"], err
