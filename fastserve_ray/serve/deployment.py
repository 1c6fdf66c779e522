"""The LLM server as a Ray Serve replica: health checks, autoscaling stats and metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastserve_ray.serve.server import LLMServer

log = logging.getLogger("ray.serve")

# What a replica reports to the autoscaling policy (keys of LLMEngine.load_snapshot()).
AUTOSCALING_KEYS = ("num_waiting", "num_running", "kv_cache_usage")


class LLMServerDeployment(LLMServer):
    """One replica: an engine plus Serve's hooks. Handle callers use ``generate``/``generate_stream``."""

    def __init__(self, model_path: str, served_name: str, engine_options: dict[str, Any] | None = None,
                 default_max_tokens: int | None = None, num_threads: int | None = None,
                 stream_interval_s: float = 0.0, engine_process: bool = False) -> None:
        started = time.perf_counter()
        import torch
        from ray import serve

        from fastserve_ray.models.model_store import local_model_dir
        from fastserve_ray.serve.metrics import ServerMetrics

        # An s3:// model: this node's verified copy, downloaded once per node (models/model_store.py).
        model_path = str(local_model_dir(model_path))
        fetched = time.perf_counter()

        # One intra-op thread per logical CPU the replica was given: two replicas on a 2-core
        # machine would otherwise each spawn a thread per core and fight over them.
        if num_threads:
            torch.set_num_threads(num_threads)
        engine = None
        if engine_process:  # the step loop in a child process, with the replica's threads
            from fastserve_ray.engine.process_async_engine import ProcessLLMEngine

            engine = ProcessLLMEngine(model_path, engine_options, num_threads=num_threads)
        super().__init__(model_path, served_name, engine_options, default_max_tokens, engine=engine,
                         stream_interval_s=stream_interval_s)
        self.metrics = ServerMetrics(served_name, self.load)
        self.fingerprint = f"replica-{serve.get_replica_context().replica_id.unique_id}"
        from fastserve_ray.models.model_dir import lineage_summary, read_manifest

        self.lineage = lineage_summary(read_manifest(model_path, verify=False))
        # Where this replica's cold start went (GET /v1/models/{id} reports it; docs/serving.md).
        inner = getattr(self.engine, "startup_s", None) or getattr(getattr(self.engine, "engine", None),
                                                                    "startup_s", {})
        self.startup_s = {"download_s": fetched - started, **inner,
                          "replica_init_s": time.perf_counter() - started}
        log.info("replica of %s ready: %s", served_name,
                 ", ".join(f"{k} {v:.2f}" for k, v in self.startup_s.items()))

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        if not self.engine.is_running:
            raise RuntimeError(f"the engine loop of {self.served_name!r} is not running")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Engine load for the LLM-aware autoscaling policy."""
        snap = self.load()
        return {k: float(snap[k]) for k in AUTOSCALING_KEYS}

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the prefix-aware router reads (serve/prefix_router.py), every
        ``request_routing_stats_period_s``: the engine's block size and the short hashes of the
        blocks in its prefix cache, never tokens (engine/prefix_summary.py).

        Serve polls this whenever a deployment defines it, whatever its router; under Serve's
        default router nothing reads the summary, so nothing is built or broadcast.
        """
        import asyncio

        from fastserve_ray.serve.prefix_router import uses_prefix_router

        if not uses_prefix_router():
            return {}
        summary = getattr(self.engine, "prefix_cache_summary", None)  # ProcessLLMEngine: async
        if summary is not None:
            data = await summary()
        else:  # the step loop is a thread of this replica: the summary waits for its lock
            data = await asyncio.to_thread(self.engine.engine.prefix_cache_summary)
        return {"prefix_cache": data, "max_model_len": self.max_model_len}

    def __del__(self) -> None:
        # Serve calls __del__ after draining: stop the metrics thread and the engine loop.
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5.0)
