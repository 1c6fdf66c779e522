"""The serving config: models, HTTP, auth and autoscaling, validated with pydantic (unknown keys rejected).

Users write only what differs from the defaults (YAML, CLI flags or a dict); everything else is
filled in here, the way Ray Serve LLM merges its default deployment options under the user's.
Errors are ConfigErrors naming the field path, e.g. ``models.0.autoscaling.max_replicas``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fastserve_ray.errors import ConfigError, FastServeError

API_KEY_ENV = "FASTSERVE_API_KEY"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AutoscalingOptions(_Strict):
    """Replica bounds and the scaling signal; delays and intervals are Ray Serve's knobs."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # "llm": engine-aware policy (waiting/running sequences, KV cache); "ongoing_requests":
    # Ray Serve's default policy on requests in flight per replica.
    policy: Literal["llm", "ongoing_requests"] = "llm"
    # "llm" policy: sequences a replica should run at steady state (None: half its batch).
    target_running_per_replica: float | None = Field(None, gt=0)
    max_waiting_per_replica: float = Field(1.0, ge=0)  # queued in the engine before scaling up
    kv_cache_high: float = Field(0.9, gt=0, le=1)  # scale up above this KV-cache utilisation
    kv_cache_low: float = Field(0.5, ge=0, le=1)  # scale down only below this
    # "ongoing_requests" policy: requests in flight per replica (None: half its batch).
    target_ongoing_requests: float | None = Field(None, gt=0)
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    # min_replicas 0: how long the last replica stays idle before it goes (None: downscale_delay_s).
    # The first request after that waits at the router while a replica starts (docs/serving.md).
    downscale_to_zero_delay_s: float | None = Field(None, ge=0)
    metrics_interval_s: float = Field(1.0, gt=0)
    look_back_period_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingOptions:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        if self.kv_cache_low > self.kv_cache_high:
            raise ValueError("kv_cache_low must be <= kv_cache_high")
        return self


class ModelOptions(_Strict):
    """One served model: its directory, name, engine options and replica options."""

    path: str
    name: str | None = None  # default: the directory's name
    engine: dict[str, Any] = Field(default_factory=dict)  # EngineConfig keys (policy, max_num_seqs, ...)
    autoscaling: AutoscalingOptions = Field(default_factory=AutoscalingOptions)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)  # default: the engine's max_num_seqs
    max_queued_requests: int = Field(64, ge=-1)  # waiting at the router before answering 503
    # Router mode: longest a request waits at the router for a replica to take it (a cold start
    # from zero replicas, or every replica full) before a 503 + Retry-After. None: no limit.
    max_router_wait_s: float | None = Field(300.0, gt=0)
    # Longest a generation may take: the drain on downscale waits this long for in-flight ones.
    max_generation_s: float = Field(120.0, gt=0)
    health_check_period_s: float = Field(5.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    # Chat without max_tokens: the rest of the context (None), or at most this many tokens.
    default_max_tokens: int | None = Field(None, ge=1)
    # Streams send a chunk at most this often, merging the tokens in between (the first token
    # and the end go at once). 0 sends every token as its own chunk; see docs/serving.md.
    stream_interval_ms: float = Field(50.0, ge=0, le=10_000)
    # Run the engine's step loop in a child process of the replica instead of a thread beside
    # Serve's event loop (they would share one GIL); see docs/serving.md.
    engine_process: bool = True
    # How Serve picks a replica for each request: "default" is Serve's own (the less loaded of
    # two random replicas); "prefix_aware" prefers the replica whose engine caches the longest
    # prefix of the prompt while the load is balanced (serve/prefix_router.py, docs/serving.md).
    router: Literal["default", "prefix_aware"] = "default"

    @property
    def served_name(self) -> str:
        """The name clients put in ``model``."""
        return self.name or Path(self.path.rstrip("/")).name


class HttpOptions(_Strict):
    """Where the HTTP proxy listens and what a request may look like."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None  # None: FASTSERVE_API_KEY if set, else no auth
    max_body_bytes: int = Field(1 << 20, ge=1024)
    retry_after_s: int = Field(1, ge=0)  # Retry-After on 503 overload answers
    # Serve's HTTP proxies: one on every node (the default) or on the head only.
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"


class ServeConfig(_Strict):
    """A whole application: the models and the HTTP front."""

    models: list[ModelOptions] = Field(min_length=1)
    http: HttpOptions = Field(default_factory=HttpOptions)
    app_name: str = "fastserve"
    route_prefix: str = "/"
    # "router": an HTTP front deployment routes by `model` to each model's LLM servers (retries a
    # request whose replica died before answering; OpenAI-shaped 503 on overload). "direct": the
    # LLM server replicas speak HTTP themselves, one hop fewer per streamed chunk (one model only;
    # overload is Serve's plain-text 503 + Retry-After, no retry). See docs/serving.md.
    ingress: Literal["router", "direct"] = "router"
    ingress_replicas: int = Field(1, ge=1)  # router mode: front replicas (>= 2 survives losing a node)
    ingress_max_ongoing_requests: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ServeConfig:
        names = [m.served_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"served model names must be unique, {dupes[0]!r} appears twice")
        if self.ingress == "direct" and len(self.models) != 1:
            raise ValueError(f"ingress 'direct' serves exactly one model, got {len(self.models)}; "
                             "use ingress 'router' for several")
        if self.ingress == "direct" and self.models[0].router == "prefix_aware":
            # Serve's HTTP proxy routes direct-mode requests before reading their bodies, so no
            # router ever sees the prompt (docs/serving.md, "Prefix-aware routing").
            raise ValueError("models.0.router 'prefix_aware' needs ingress 'router': with ingress "
                             "'direct', Serve's proxy picks the replica before the prompt is read")
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "serve config") -> ServeConfig:
        """Validate a plain mapping; a ConfigError names the field path and the problem."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
            raise ConfigError(f"{where}: {loc}: {err['msg']}, got {err.get('input')!r}{more}") from None

    def resolved_api_key(self) -> str | None:
        """The configured key, else FASTSERVE_API_KEY from the environment, else None."""
        return self.http.api_key or os.environ.get(API_KEY_ENV) or None


def engine_options(model: ModelOptions) -> dict[str, Any]:
    """The model's engine options, validated by the engine's own config (names the bad key)."""
    from fastserve_ray.engine import EngineConfig

    EngineConfig.from_dict(model.engine, where=f"models[{model.served_name}].engine")
    return dict(model.engine)


def check_model_dirs(config: ServeConfig) -> None:
    """Fail before deploying when a model directory is missing or unreadable."""
    from fastserve_ray.models.model_dir import read_config, read_manifest
    from fastserve_ray.models.model_store import is_remote

    for m in config.models:
        remote = is_remote(m.path)  # s3://...: each replica downloads it into its node's cache
        if not remote and not Path(m.path).is_dir():
            raise ConfigError(f"model directory {m.path} does not exist")
        try:
            if remote:
                read_manifest(m.path, verify=False)
            read_config(m.path)
        except FastServeError as e:
            raise ConfigError(f"model directory {m.path}: {e}") from None
        engine_options(m)
