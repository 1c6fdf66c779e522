"""Helpers for the serving tests: a private Ray per module, free ports, replica counts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def running_replicas(app: str, deployment: str) -> int:
    """RUNNING replicas of a deployment, from serve.status()."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of a deployment (namespace "serve"); no dashboard needed."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix))


def hang_up_after_first_token(url: str, key: str, model: str, max_tokens: int) -> None:
    """Stream a long completion and close the connection as soon as the first text arrives."""
    import httpx

    body = {"model": model, "prompt": "a long story", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    with (httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c,
          c.stream("POST", "/v1/completions", json=body) as r):
        assert r.status_code == 200
        for ln in r.iter_lines():
            if ln.startswith("data: ") and '"text"' in ln:
                return  # leaving the block closes the connection mid-stream


def burst(url: str, key: str, body: dict[str, Any], n: int = 8) -> list[tuple[Any, float]]:
    """``n`` identical completions at once (threads released together): (response, seconds) each."""
    import threading

    import httpx

    results: list[tuple[Any, float]] = []
    start = threading.Barrier(n)

    def one() -> None:
        start.wait()
        t = time.monotonic()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            r = c.post("/v1/completions", json=body)
        results.append((r, time.monotonic() - t))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def assert_fast_503s(results: list[tuple[Any, float]]) -> list[Any]:
    """Some answered, some refused with 503 + Retry-After, each refusal faster than any answer."""
    statuses = sorted(r.status_code for r, _ in results)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}, statuses
    slowest_ok = max(dt for r, dt in results if r.status_code == 200)
    refused = [r for r, dt in results if r.status_code == 503]
    for r, dt in results:
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "1", r.headers
            assert dt < slowest_ok, (dt, slowest_ok)  # refused at once, not after a slot freed
    return refused


def call_server(server: Any, kind: str, body: dict[str, Any], model: str = "tiny") -> dict[str, Any]:
    """A whole answer of an in-process LLMServer ("completion" or "chat")."""
    import asyncio

    return asyncio.run(server.generate(kind, {"model": model, **body}))


def stream_server(server: Any, kind: str, body: dict[str, Any], model: str = "tiny") -> list[dict[str, Any]]:
    """Every chunk of an in-process LLMServer's streamed answer."""
    import asyncio

    async def run() -> list[dict[str, Any]]:
        return [c async for c in server.generate_stream(kind, {"model": model, "stream": True, **body})]

    return asyncio.run(run())
