"""An LLM-aware Ray Serve autoscaling policy fed by each replica's engine load.

Requests in flight are a poor signal for an LLM: a replica with 8 long generations and one
with 8 nearly-done ones look the same, and neither says whether the KV cache is about to force
preemptions. Each replica reports (``record_autoscaling_stats``) its engine's waiting and
running sequences and KV-cache utilisation; this policy turns them into a replica count:

    demand  = max(sum of running + waiting sequences, requests Serve counts in flight)
    desired = demand / target_running_per_replica
    scale up by at least one when the engines queue (waiting > max_waiting_per_replica x replicas)
      or any replica's KV cache is above kv_cache_high
    never scale down while any replica's KV cache is above kv_cache_low

Serve then applies ``upscale_delay_s`` / ``downscale_delay_s``, the scaling factors and the
min/max bounds. This module is pickled by value into the Serve controller: keep it small.
"""

from __future__ import annotations

from typing import Any


def desired_replicas(*, current: int, running: float, waiting: float, kv_max: float | None,
                     ongoing: float, target_running_per_replica: float, max_waiting_per_replica: float,
                     kv_cache_high: float, kv_cache_low: float) -> float:
    """The replica count the engine load asks for (a float; Serve rounds and bounds it)."""
    demand = max(running + waiting, ongoing)
    desired = demand / target_running_per_replica
    queueing = waiting > max_waiting_per_replica * current
    cache_full = kv_max is not None and kv_max >= kv_cache_high
    if queueing or cache_full:
        desired = max(desired, current + 1)
    if desired < current and kv_max is not None and kv_max > kv_cache_low:
        desired = current  # shrinking now would push a busy cache into preemption
    return desired


class LLMAutoscalingPolicy:
    """Ray Serve ``AutoscalingPolicy`` callable; ``policy_kwargs`` are the constructor's arguments."""

    def __init__(self, target_running_per_replica: float = 8.0, max_waiting_per_replica: float = 1.0,
                 kv_cache_high: float = 0.9, kv_cache_low: float = 0.5) -> None:
        self.target_running_per_replica = target_running_per_replica
        self.max_waiting_per_replica = max_waiting_per_replica
        self.kv_cache_high = kv_cache_high
        self.kv_cache_low = kv_cache_low

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """Serve's AutoscalingContext in; (desired replicas, policy state) out."""
        current = ctx.current_num_replicas
        if current == 0:
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        running = sum(metrics.get("num_running", {}).values())
        waiting = sum(metrics.get("num_waiting", {}).values())
        kv = metrics.get("kv_cache_usage", {})
        desired = desired_replicas(
            current=current, running=running, waiting=waiting, kv_max=max(kv.values()) if kv else None,
            ongoing=ctx.total_num_requests, target_running_per_replica=self.target_running_per_replica,
            max_waiting_per_replica=self.max_waiting_per_replica, kv_cache_high=self.kv_cache_high,
            kv_cache_low=self.kv_cache_low,
        )
        return desired, {"last_demand": max(running + waiting, ctx.total_num_requests)}
