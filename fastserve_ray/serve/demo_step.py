"""The demo's last step: serve a model on Ray Serve, query it over HTTP and a handle, then remove it.

Only the demo's own application is deleted: on a shared cluster, other Serve applications
(a pipeline's deployment, a team's models) keep running.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

DEMO_APP = "fastserve-demo"


def serve_and_query(model_dir: Path, prompt: str, max_tokens: int) -> dict[str, Any]:
    """Deploy ``model_dir`` (free port), print one completion over HTTP and one via a handle."""
    import httpx
    import ray
    from ray import serve

    from fastserve_ray.cluster import ensure_ray
    from fastserve_ray.serve.client import complete_sync, get_model_handle
    from fastserve_ray.serve.command import deploy, free_port
    from fastserve_ray.serve.config import ServeConfig

    name = Path(model_dir).name
    cfg = ServeConfig.from_dict({"models": [{"path": str(model_dir), "name": name,
                                             "autoscaling": {"min_replicas": 1, "max_replicas": 1}}],
                                 "http": {"port": free_port()}, "app_name": DEMO_APP,
                                 "route_prefix": f"/{DEMO_APP}"})
    started_ray = not ray.is_initialized()
    ensure_ray()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the demo prints its own progress
    try:
        url = deploy(cfg, log_level="WARNING")
        print(f"[serve] {name} at {url}/v1")
        body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        http_text = r.json()["choices"][0]["text"]
        print(f"[serve] HTTP POST /v1/completions: {prompt}{http_text}")
        handle_text = complete_sync(get_model_handle(name, cfg.app_name), body)["choices"][0]["text"]
        print(f"[serve] DeploymentHandle:          {prompt}{handle_text}")
        return {"url": url, "model": name, "prompt": prompt, "http_text": http_text,
                "handle_text": handle_text}
    finally:
        serve.delete(DEMO_APP)  # never serve.shutdown(): that deletes every application
        if started_ray:
            serve.shutdown()
            ray.shutdown()
