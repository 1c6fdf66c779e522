"""``build_app(config)``: the Serve application (the ``import_path`` of deployments/serve.yaml).

One LLM server deployment per model (autoscaled, each replica an engine) behind one OpenAI
ingress deployment that routes by the request's ``model``. Deployment options are derived from
the engine's batch so the defaults make sense for an LLM; the user's config overrides them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastserve_ray.models.model_store import is_remote
from fastserve_ray.serve.config import ModelOptions, ServeConfig, check_model_dirs, engine_options

POLICY_IMPORT_PATH = "fastserve_ray.serve.autoscaling:LLMAutoscalingPolicy"
INGRESS_NAME = "OpenAIIngress"


def server_deployment_name(served_name: str) -> str:
    """The Serve deployment name of a model's LLM server."""
    return "LLMServer-" + re.sub(r"[^A-Za-z0-9_.-]", "_", served_name)


def deployment_options(m: ModelOptions) -> dict[str, Any]:
    """Ray Serve options for one model's LLM server, sized from its engine batch."""
    from fastserve_ray.engine import EngineConfig

    max_num_seqs = EngineConfig.from_dict(m.engine).max_num_seqs
    # A replica takes as many requests as its engine batches; more would only queue inside it,
    # hiding load from the router and the autoscaler.
    max_ongoing = m.max_ongoing_requests or max_num_seqs
    a = m.autoscaling
    half_batch = max(1.0, max_ongoing / 2)
    autoscaling: dict[str, Any] = {
        "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
        "initial_replicas": a.initial_replicas,
        "target_ongoing_requests": a.target_ongoing_requests or half_batch,
        "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
        "downscale_to_zero_delay_s": a.downscale_to_zero_delay_s,
        "metrics_interval_s": a.metrics_interval_s, "look_back_period_s": a.look_back_period_s,
    }
    if a.policy == "llm":
        autoscaling["policy"] = {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": {
            "target_running_per_replica": a.target_running_per_replica or half_batch,
            "max_waiting_per_replica": a.max_waiting_per_replica,
            "kv_cache_high": a.kv_cache_high, "kv_cache_low": a.kv_cache_low}}
    options: dict[str, Any] = {}
    if m.router == "prefix_aware":
        from fastserve_ray.serve.prefix_router import router_config

        # Balanced: the replica with the prefix has at most a quarter batch more in flight than
        # the least loaded one (at least 1): a prefill saved is worth that much sharing of steps.
        model_path = m.path if is_remote(m.path) else str(Path(m.path).resolve())
        block_size = EngineConfig.from_dict(m.engine).block_size
        options["request_router_config"] = router_config(model_path, m.served_name, block_size,
                                                         imbalanced_threshold=max(1, max_ongoing // 4))
    return options | {
        "name": server_deployment_name(m.served_name),
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": m.max_queued_requests,
        # Drain: a replica picked for removal gets no new requests and finishes what it has.
        "graceful_shutdown_timeout_s": m.max_generation_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": m.health_check_period_s,
        "health_check_timeout_s": m.health_check_timeout_s,
        "autoscaling_config": autoscaling,
        "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
    }


def build_app(config: ServeConfig | Mapping[str, Any]) -> Any:
    """A Serve Application for ``config`` (a ServeConfig or its dict form, as in serve.yaml's args)."""
    from ray import serve

    from fastserve_ray.serve.deployment import LLMServerDeployment
    from fastserve_ray.serve.ingress import make_ingress_class

    cfg = config if isinstance(config, ServeConfig) else ServeConfig.from_dict(config)
    check_model_dirs(cfg)

    def server_args(m: ModelOptions) -> tuple[Any, ...]:
        threads = max(1, int(m.num_cpus)) if m.num_gpus == 0 else None
        path = m.path if is_remote(m.path) else str(Path(m.path).resolve())
        return (path, m.served_name, engine_options(m), m.default_max_tokens, threads,
                m.stream_interval_ms / 1000, m.engine_process)

    front = (cfg.resolved_api_key(), cfg.http.max_body_bytes, cfg.http.retry_after_s)
    if cfg.ingress == "direct":  # the LLM server replicas are the HTTP front themselves
        (m,) = cfg.models
        # Overload is answered by Serve's proxy (the request never reaches a replica): 503 with
        # the same Retry-After as router mode.
        backpressure = {"status_code": 503, "retry_after_s": cfg.http.retry_after_s}
        direct = make_ingress_class(*front, server_class=LLMServerDeployment)
        options = deployment_options(m) | {"backpressure_config": backpressure}
        return serve.deployment(direct, **options).bind(*server_args(m))
    servers = {m.served_name: serve.deployment(LLMServerDeployment, **deployment_options(m)).bind(
        *server_args(m)) for m in cfg.models}
    ingress = make_ingress_class(*front)
    return serve.deployment(
        ingress, name=INGRESS_NAME, num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(servers, {m.served_name: m.max_router_wait_s for m in cfg.models})
