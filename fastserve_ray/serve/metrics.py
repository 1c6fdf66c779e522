"""Per-replica Prometheus metrics (ray.serve.metrics), under vLLM's names so Ray's dashboards work.

Ray exports them on every node's metrics port with a ``ray_`` prefix (counters also get
``_total``), tagged with the Serve deployment/replica/application, Ray's ``WorkerId``, and
``model_name`` (the served name). Every metric vLLM also has carries vLLM's name
(``vllm_num_requests_running`` -> ``ray_vllm_num_requests_running``): Ray's own Serve LLM
Grafana dashboard (``serve_llm_dashboard_panels.py``) queries exactly those, so it shows our
replicas unchanged. What vLLM has no metric for is ``fastserve_*`` (requests that failed, by
status; swaps). Units follow Prometheus: seconds (``_seconds``), token counts, fractions.

Engine load (waiting/running/swapped sequences, KV-cache use, preemptions, swaps) is sampled
from ``LLMEngine.load_snapshot()`` by a small daemon thread, so it is fresh even when nobody asks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ray.serve import metrics

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
TOKEN_COUNT_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]
TAGS = ("model_name",)

# (metric name, snapshot key, help): gauges of the engine's current load.
_GAUGES = {
    "vllm_num_requests_running": ("num_running", "sequences in the running batch"),
    "vllm_num_requests_waiting": ("num_waiting", "sequences waiting to be scheduled"),
    "vllm_num_requests_swapped": ("num_swapped", "sequences whose KV is in the host tier"),
    "vllm_kv_cache_usage_perc": ("kv_cache_usage", "fraction of device KV blocks in use (0-1)"),
}
# (metric name, snapshot key, help): lifetime counters, exported as deltas.
_COUNTERS = {
    "vllm_num_preemptions": ("num_preempted", "sequences whose KV was dropped for recompute"),
    "fastserve_swapped_out": ("num_swapped_out", "sequences whose KV moved to the host tier"),
    "fastserve_swapped_in": ("num_swapped_in", "sequences whose KV came back from the host tier"),
}
# Per-request histograms: name -> (help, buckets).
_HISTOGRAMS = {
    "vllm_time_to_first_token_seconds": ("arrival to the first output token", LATENCY_BUCKETS),
    "vllm_request_time_per_output_token_seconds": ("mean time per output token after the first",
                                                   TOKEN_LATENCY_BUCKETS),
    "vllm_e2e_request_latency_seconds": ("arrival to finish", LATENCY_BUCKETS),
    "vllm_request_queue_time_seconds": ("arrival to first scheduled", LATENCY_BUCKETS),
    "vllm_request_prefill_time_seconds": ("first scheduled to the first token", LATENCY_BUCKETS),
    "vllm_request_decode_time_seconds": ("first token to finish", LATENCY_BUCKETS),
    "vllm_request_prompt_tokens": ("prompt length in tokens", TOKEN_COUNT_BUCKETS),
    "vllm_request_generation_tokens": ("output length in tokens", TOKEN_COUNT_BUCKETS),
}
_REQUEST_COUNTERS = {
    "vllm_request_success": "requests finished, by finished_reason (stop, length, tool_calls, abort)",
    "vllm_prompt_tokens": "prompt tokens, once per request",
    "vllm_generation_tokens": "generated tokens",
    "vllm_prefix_cache_queries": "prompt tokens looked up in the prefix cache",
    "vllm_prefix_cache_hits": "prompt tokens found in the prefix cache",
    "fastserve_requests": "requests answered, by status (finish reason, or the HTTP error status)",
}

QUEUE_GAUGE = "fastserve_mlfq_queue_seqs"  # tagged with the queue level
METRIC_NAMES = (*_REQUEST_COUNTERS, *_HISTOGRAMS, *_GAUGES, *_COUNTERS, QUEUE_GAUGE)


def exported_name(name: str) -> str:
    """The name Prometheus sees: Ray's ``ray_`` prefix, and ``_total`` on counters."""
    counter = name in _REQUEST_COUNTERS or name in _COUNTERS
    return f"ray_{name}{'_total' if counter else ''}"


class ServerMetrics:
    """The metrics of one LLM server replica."""

    def __init__(self, model: str, snapshot: Callable[[], dict[str, float]], period_s: float = 1.0) -> None:
        self.model = model
        self.counters = {n: metrics.Counter(n, h, tag_keys=TAGS) for n, h in _REQUEST_COUNTERS.items()}
        self.counters["vllm_request_success"] = metrics.Counter(
            "vllm_request_success", _REQUEST_COUNTERS["vllm_request_success"],
            tag_keys=(*TAGS, "finished_reason"))
        self.counters["fastserve_requests"] = metrics.Counter(
            "fastserve_requests", _REQUEST_COUNTERS["fastserve_requests"], tag_keys=(*TAGS, "status"))
        self.histograms = {n: metrics.Histogram(n, h, boundaries=b, tag_keys=TAGS)
                           for n, (h, b) in _HISTOGRAMS.items()}
        self.gauges = {n: metrics.Gauge(n, h, tag_keys=TAGS) for n, (_, h) in _GAUGES.items()}
        self.engine_counters = {n: metrics.Counter(n, h, tag_keys=TAGS) for n, (_, h) in _COUNTERS.items()}
        self.queue_seqs = metrics.Gauge(QUEUE_GAUGE, "MLFQ: unfinished sequences in each queue (0 first)",
                                        tag_keys=(*TAGS, "queue"))
        self._last: dict[str, float] = {}
        self._snapshot = snapshot
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period_s,), name="serve-metrics",
                                        daemon=True)
        self._thread.start()

    def _tags(self, **extra: str) -> dict[str, str]:
        return {"model_name": self.model, **extra}

    def record_error(self, status: str) -> None:
        """A request refused or failed before any output (400, 404, 499 = client gone, 503)."""
        self.counters["fastserve_requests"].inc(1, self._tags(status=status))

    def record_request(self, reason: str, out: Any, prompt_tokens: int, cached_tokens: int) -> None:
        """One finished sample (a RequestOutput); ``prompt_tokens`` is 0 for a prompt's later
        samples (n > 1), so the prompt is counted once per request."""
        tags = self._tags()
        self.counters["fastserve_requests"].inc(1, self._tags(status=reason))
        self.counters["vllm_request_success"].inc(1, self._tags(finished_reason=reason))
        if prompt_tokens:
            self.counters["vllm_prompt_tokens"].inc(prompt_tokens, tags)
            self.counters["vllm_prefix_cache_queries"].inc(prompt_tokens, tags)
            self.histograms["vllm_request_prompt_tokens"].observe(prompt_tokens, tags)
            if cached_tokens:
                self.counters["vllm_prefix_cache_hits"].inc(cached_tokens, tags)
        generated = out.num_output_tokens
        if generated:
            self.counters["vllm_generation_tokens"].inc(generated, tags)
        self.histograms["vllm_request_generation_tokens"].observe(generated, tags)
        m = out.metrics
        for name, value in (("vllm_time_to_first_token_seconds", m.time_to_first_token),
                            ("vllm_request_time_per_output_token_seconds", out.time_per_output_token),
                            ("vllm_e2e_request_latency_seconds", m.job_completion_time),
                            ("vllm_request_queue_time_seconds",
                             _span(m.arrival_time, m.first_scheduled_time)),
                            ("vllm_request_prefill_time_seconds",
                             _span(m.first_scheduled_time, m.first_token_time)),
                            ("vllm_request_decode_time_seconds", _span(m.first_token_time, m.finish_time))):
            if value is not None:
                self.histograms[name].observe(value, tags)

    def update_load(self, snap: dict[str, float]) -> None:
        """Set the load gauges and advance the lifetime counters from one engine snapshot."""
        for name, (key, _) in _GAUGES.items():
            self.gauges[name].set(snap.get(key, 0.0), self._tags())
        for level, count in enumerate(snap.get("queue_seqs") or []):
            self.queue_seqs.set(count, self._tags(queue=str(level)))
        for name, (key, _) in _COUNTERS.items():
            value = snap.get(key, 0.0)
            delta = value - self._last.get(key, 0.0)
            if delta > 0:
                self.engine_counters[name].inc(delta, self._tags())
            self._last[key] = value

    def _loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                self.update_load(self._snapshot())
            except Exception:  # a shut-down engine: nothing left to report
                return

    def stop(self) -> None:
        """Stop sampling the engine."""
        self._stop.set()


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)
