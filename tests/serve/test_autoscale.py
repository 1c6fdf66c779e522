"""Autoscaling under real load: 1 -> 2 replicas, a replica killed mid-load, zero-loss drain back to 1.

Intervals are shrunk through the serving config (metrics every 0.5 s, 1.5 s look-back, short
delays) so the scenarios take seconds, not Serve's default minutes.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from serve_helpers import replica_actor_names, running_replicas, wait_for

from fastserve_ray.serve.builder import server_deployment_name
from fastserve_ray.serve.command import deploy, free_port
from fastserve_ray.serve.config import ServeConfig

APP = "fastserve"
DEPLOYMENT = server_deployment_name("tiny")


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path):
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    cfg = ServeConfig.from_dict({"models": [{
        "path": str(tiny_model_dir), "name": "tiny", "engine": {"max_num_seqs": 4},
        "health_check_period_s": 1.0, "max_generation_s": 60.0,
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_running_per_replica": 2,
                        "upscale_delay_s": 0.5, "downscale_delay_s": 3.0, "metrics_interval_s": 0.5,
                        "look_back_period_s": 1.5},
    }], "http": {"port": free_port()}})
    yield deploy(cfg)
    serve.shutdown()
    ray.shutdown()


class Load:
    """Client threads sending requests in a loop; every response is kept and checked."""

    def __init__(self, url: str, clients: int, max_tokens: int, stream: bool = False) -> None:
        self.url, self.max_tokens, self.stream = url, max_tokens, stream
        self.results: list[dict] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _one(self, c: httpx.Client) -> dict:
        body = {"model": "tiny", "prompt": "load", "max_tokens": self.max_tokens, "ignore_eos": True}
        t0 = time.monotonic()
        if not self.stream:
            r = c.post("/v1/completions", json=body)
            d = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            return {"status": r.status_code, "tokens": d.get("usage", {}).get("completion_tokens"),
                    "replica": d.get("system_fingerprint"), "start": t0, "end": time.monotonic()}
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        with c.stream("POST", "/v1/completions", json=body) as r:
            events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        ok = r.status_code == 200 and events[-1:] == ["[DONE]"] and not any("error" in c for c in chunks)
        return {"status": r.status_code if ok else 599, "tokens": chunks[-1]["usage"]["completion_tokens"]
                if ok else None, "replica": chunks[0].get("system_fingerprint") if chunks else None,
                "start": t0, "end": time.monotonic()}

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self._stop.is_set():
                try:
                    self.results.append(self._one(c))
                except httpx.HTTPError as e:
                    self.results.append({"status": 0, "error": repr(e), "tokens": None, "replica": None,
                                         "start": 0, "end": time.monotonic()})

    def stop(self) -> list[dict]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        return self.results

    def failures(self) -> list[dict]:
        return [r for r in self.results if r["status"] != 200 or r["tokens"] != self.max_tokens]


def _kill(name: str) -> None:
    # The handle must be gone before ray.shutdown(): finalizing it later ends the process.
    handle = ray.get_actor(name, namespace="serve")
    ray.kill(handle, no_restart=True)
    del handle


def test_scale_up_survive_a_killed_replica_then_drain_down(url: str) -> None:
    """One load cycle: 1 -> 2 replicas, one killed mid-load and replaced, then a drain back to 1."""
    assert running_replicas(APP, DEPLOYMENT) == 1
    t0 = time.monotonic()
    heavy = Load(url, clients=6, max_tokens=12)
    wait_for(lambda: running_replicas(APP, DEPLOYMENT) >= 2, 120, "a second replica under load")
    wait_for(lambda: len({r["replica"] for r in heavy.results if r["end"] > t0}) >= 2, 60,
             "responses from both replicas")
    print(f"\nscale-up reaction (load start -> 2 replicas serving): {time.monotonic() - t0:.1f}s")

    # A replica process killed mid-load: only what was in flight on it may fail.
    victims = replica_actor_names(APP, DEPLOYMENT)
    assert len(victims) == 2
    _kill(victims[0])
    t_kill = time.monotonic()
    wait_for(lambda: any(r["start"] > t_kill and r["status"] == 200 for r in heavy.results), 30,
             "the service answering after the kill")
    wait_for(lambda: running_replicas(APP, DEPLOYMENT) >= 2
             and len(set(replica_actor_names(APP, DEPLOYMENT)) - {victims[0]}) >= 2, 120,
             "a replacement replica")
    recovery = time.monotonic() - t_kill
    t_back = time.monotonic()
    # Serving is proven by answers, not by RUNNING: the proxy learns of a new replica a moment
    # after the controller does, so wait until both replicas (survivor and replacement) answer.
    wait_for(lambda: len({r["replica"] for r in heavy.results if r["start"] > t_back}) >= 2, 60,
             "answers from the survivor and the replacement")
    killed_failures = [r for r in heavy.results if r["status"] != 200 or r["tokens"] != 12]
    print(f"replica killed mid-load: {len(killed_failures)} failed, replacement after {recovery:.1f}s")
    assert len(killed_failures) <= 4, killed_failures[:4]  # at most the killed replica's batch

    # Light but long requests keep running while the autoscaler removes a replica.
    light = Load(url, clients=2, max_tokens=48, stream=True)
    t_light = time.monotonic()
    wait_for(lambda: len({r["replica"] for r in light.results if r["start"] > t_light}) >= 2, 60,
             "light requests on both replicas before the load drops")
    heavy_results = heavy.stop()
    replicas_before = {r["replica"] for r in heavy_results if r["start"] > t_back}
    wait_for(lambda: running_replicas(APP, DEPLOYMENT) == 1, 120, "scale-down to the minimum")
    t_down = time.monotonic()
    wait_for(lambda: any(r["start"] > t_down for r in light.results), 60, "a request after the scale-down")
    light_results = light.stop()
    assert all(r["status"] == 200 and r["tokens"] == 12 for r in heavy_results if r["start"] > t_back)
    assert not light.failures(), light.failures()[:3]
    survivors = {r["replica"] for r in light_results if r["start"] > t_down}
    removed = replicas_before - survivors
    drained = [r for r in light_results if r["replica"] in removed]
    print(f"requests: {len(heavy_results)} under load, {len(light_results)} during the drain "
          f"({len(drained)} finished on the removed replica); failed during the drain: 0")
    assert len(survivors) == 1 and drained, (survivors, replicas_before)
    assert running_replicas(APP, DEPLOYMENT) == 1  # back at min_replicas once the load is gone
