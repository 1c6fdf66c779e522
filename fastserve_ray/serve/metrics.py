"""Per-replica Prometheus metrics (ray.serve.metrics): requests, tokens, latencies, engine load.

Exported by Ray on every node's metrics port with a ``ray_`` prefix (counters also get
``_total``), tagged with the Serve deployment/replica/application and the served ``model``.
Engine load (waiting/running sequences, KV-cache use, preemptions, swaps) is sampled from
``LLMEngine.load_snapshot()`` by a small daemon thread, so it is fresh even when nobody asks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ray.serve import metrics

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]

# (metric name, snapshot key): gauges of the engine's current load.
_GAUGES = {
    "fastserve_num_waiting_seqs": "num_waiting",
    "fastserve_num_running_seqs": "num_running",
    "fastserve_num_swapped_seqs": "num_swapped",
    "fastserve_kv_cache_usage": "kv_cache_usage",
}
# (metric name, snapshot key): lifetime counters, exported as deltas.
_COUNTERS = {
    "fastserve_preemptions": "num_preempted",
    "fastserve_swapped_out": "num_swapped_out",
    "fastserve_swapped_in": "num_swapped_in",
}

METRIC_NAMES = (
    "fastserve_requests", "fastserve_prompt_tokens", "fastserve_generation_tokens",
    "fastserve_time_to_first_token_s", "fastserve_time_per_output_token_s",
    "fastserve_e2e_latency_s", *_GAUGES, *_COUNTERS,
)


class ServerMetrics:
    """The metrics of one LLM server replica."""

    def __init__(self, model: str, snapshot: Callable[[], dict[str, float]], period_s: float = 1.0) -> None:
        self.model = model
        tags = ("model",)
        self.requests = metrics.Counter("fastserve_requests", "requests finished, by model and status",
                                        tag_keys=("model", "status"))
        self.prompt_tokens = metrics.Counter("fastserve_prompt_tokens", "prompt tokens", tag_keys=tags)
        self.generation_tokens = metrics.Counter("fastserve_generation_tokens", "generated tokens",
                                                 tag_keys=tags)
        self.ttft = metrics.Histogram("fastserve_time_to_first_token_s", "time to first token (s)",
                                      boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.tpot = metrics.Histogram("fastserve_time_per_output_token_s",
                                      "mean time per output token after the first (s)",
                                      boundaries=TOKEN_LATENCY_BUCKETS, tag_keys=tags)
        self.e2e = metrics.Histogram("fastserve_e2e_latency_s", "request latency, arrival to finish (s)",
                                     boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.gauges = {n: metrics.Gauge(n, f"engine {k} (now)", tag_keys=tags) for n, k in _GAUGES.items()}
        self.counters = {n: metrics.Counter(n, f"engine {k} (lifetime)", tag_keys=tags)
                         for n, k in _COUNTERS.items()}
        self._last: dict[str, float] = {}
        self._snapshot = snapshot
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period_s,), name="serve-metrics",
                                        daemon=True)
        self._thread.start()

    def _tags(self, **extra: str) -> dict[str, str]:
        return {"model": self.model, **extra}

    def record_request(self, status: str, prompt_tokens: int, generated_tokens: int,
                       ttft: float | None, tpot: float | None, e2e: float | None) -> None:
        """Count one finished (or failed) request and observe its latencies."""
        self.requests.inc(1, self._tags(status=status))
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, self._tags())
        if generated_tokens:
            self.generation_tokens.inc(generated_tokens, self._tags())
        for hist, value in ((self.ttft, ttft), (self.tpot, tpot), (self.e2e, e2e)):
            if value is not None:
                hist.observe(value, self._tags())

    def update_load(self, snap: dict[str, float]) -> None:
        """Set the load gauges and advance the lifetime counters from one engine snapshot."""
        for name, key in _GAUGES.items():
            self.gauges[name].set(snap.get(key, 0.0), self._tags())
        for name, key in _COUNTERS.items():
            value = snap.get(key, 0.0)
            delta = value - self._last.get(key, 0.0)
            if delta > 0:
                self.counters[name].inc(delta, self._tags())
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
