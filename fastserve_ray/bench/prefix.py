"""Prefix-aware routing vs Serve's default router: `fastserve-ray bench serve --only prefix`.

Two applications side by side, each a model on 2 replicas behind the router front, identical
but for ``router``: ``default`` (Serve's power of two choices) and ``prefix_aware``
(serve/prefix_router.py). Both get the same seeded trace with the same Poisson arrivals,
interleaved over the repetitions (the order alternates), each repetition with a trace of its
own so that no pass finds another's prefixes cached.

The trace: ``num_prefixes`` shared system prompts of ``prefix_len`` tokens, two conversations
on each; a request is a conversation's next turn, its prompt the system prompt followed by all
of that conversation's user turns so far (a conversation restarts when it would outgrow the
context). Token-id prompts, greedy, EOS ignored, so both routers decode the same tokens.

KV sizing (why routing matters here): each replica's KV cache holds half of the prefixes plus
the private blocks of a full batch (the tails and outputs of ``max_num_seqs`` requests), so it
can never hold every prefix at once, even idle. Spread at random, each replica keeps evicting
prefixes the next request needs; with affinity, each keeps about half and hits them.

Arrivals: a calibration pass (its own trace) measures the default router's capacity at a
standing queue; the passes then arrive at ``load`` x that rate. Reported per pass: mean TTFT,
output tokens/s, the prefix-cache hit rate (cached / prompt tokens, from each response's usage)
and how many replicas answered; headline ``ttft_mean_default / ttft_mean_prefix`` per
repetition, median and spread.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastserve_ray.bench.report import print_table, write_json
from fastserve_ray.bench.trace import TraceRequest, with_poisson_arrivals

TARGET_TTFT_RATIO = 1.5  # ttft_mean_default / ttft_mean_prefix, at equal or better output tokens/s
ROUTERS = ("default", "prefix_aware")
BLOCK_SIZE = 16
KV_PREFIX_SHARE = 0.5  # of all prefixes, what one replica's cache holds beside a full batch


def make_prefix_trace(num_requests: int, num_prefixes: int, prefix_len: int, vocab_size: int, seed: int,
                      turn_len: tuple[int, int], out_len: tuple[int, int],
                      max_len: int) -> list[TraceRequest]:
    """Shared system prompts and growing conversations on them (see the module docstring)."""
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(3, vocab_size, prefix_len).tolist() for _ in range(num_prefixes)]
    conversations: list[list[int]] = [[] for _ in range(2 * num_prefixes)]  # the user turns so far
    trace = []
    for _ in range(num_requests):
        c = int(rng.integers(len(conversations)))
        turn = rng.integers(3, vocab_size, int(rng.integers(turn_len[0], turn_len[1] + 1))).tolist()
        out = int(rng.integers(out_len[0], out_len[1] + 1))
        if prefix_len + len(conversations[c]) + len(turn) + out > max_len:
            conversations[c] = []  # a new conversation on the same system prompt
        conversations[c] = conversations[c] + turn
        trace.append(TraceRequest(prefixes[c % num_prefixes] + conversations[c], out))
    return trace


def kv_blocks(trace: list[TraceRequest], num_prefixes: int, prefix_len: int, max_num_seqs: int) -> int:
    """Per replica: half the prefixes' blocks plus a full batch's private blocks (mean tail +
    output), but never all the prefixes' blocks."""
    private = statistics.mean(len(r.prompt) - prefix_len + r.output_len for r in trace)
    longest = max(len(r.prompt) + r.output_len for r in trace)
    all_prefixes = num_prefixes * math.ceil(prefix_len / BLOCK_SIZE)
    blocks = math.ceil(KV_PREFIX_SHARE * all_prefixes) + max_num_seqs * math.ceil(private / BLOCK_SIZE)
    blocks = min(blocks, all_prefixes - 1)  # never room for every prefix, even idle
    return max(blocks, math.ceil(longest / BLOCK_SIZE) + 1)  # the longest request must fit alone


def _pass(url: str, trace: list[TraceRequest], concurrency: int | None) -> Any:
    """The trace over HTTP (streaming completions): timings, cached tokens and replica per request."""
    import httpx

    from fastserve_ray.bench.serve import _drive

    async def main() -> Any:
        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            async def one(r: TraceRequest) -> dict[str, Any]:
                body = {"model": "bench", "prompt": r.prompt, "max_tokens": r.output_len, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                start, times, usage, replica = time.perf_counter(), [], None, None
                failed = {"ok": False, "tokens": 0, "start": start, "times": []}
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as resp:
                        if resp.status_code != 200:
                            await resp.aread()
                            return failed | {"end": time.perf_counter()}
                        async for line in resp.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            replica = chunk.get("system_fingerprint") or replica
                            if chunk.get("usage"):
                                usage = chunk["usage"]
                            elif chunk.get("choices"):
                                times.append(time.perf_counter())
                except httpx.HTTPError:
                    return failed | {"end": time.perf_counter()}
                tokens = usage["completion_tokens"] if usage else 0
                cached = usage["prompt_tokens_details"]["cached_tokens"] if usage else 0
                return {"ok": tokens == r.output_len, "tokens": tokens, "start": start, "times": times,
                        "end": time.perf_counter(), "cached": cached, "prompt": len(r.prompt),
                        "replica": replica}

            return await _drive(trace, one, concurrency)

    return asyncio.run(main())


def _summary(run: Any) -> dict[str, Any]:
    s = run.summary()
    ok = [r for r in run.records if r["ok"]]
    prompt = sum(r["prompt"] for r in ok)
    s["prefix_hit_rate"] = sum(r["cached"] for r in ok) / prompt if prompt else 0.0
    s["replicas_used"] = len({r["replica"] for r in ok})
    return s


def run_prefix_bench(out: Path | None, preset: str = "bench", quick: bool = False, reps: int = 3,
                     num_requests: int = 96, num_prefixes: int = 8, prefix_len: int | None = None,
                     max_num_seqs: int = 8, load: float = 0.8, seed: int = 0) -> dict[str, Any]:
    """Deploy both routers on 2 replicas each, run the interleaved passes, print, write JSON."""
    import ray
    import torch
    from ray import serve

    from fastserve_ray.bench.serve import bench_model
    from fastserve_ray.cluster import ensure_ray
    from fastserve_ray.serve.command import deploy, free_port
    from fastserve_ray.serve.config import ServeConfig

    cpus = os.cpu_count() or 1
    threads = max(1, (cpus - 1) // 2)  # per replica: two replicas of the app under load at a time
    cfg, tokenizer, model_dir, _ = bench_model(preset, seed, 1, 8)
    prefix_len = prefix_len or (256 if cfg.max_seq_len <= 512 else 384)
    turn_len, out_len = ((16, 32), (8, 16)) if quick else ((24, 48), (16, 32))
    vocab = min(cfg.vocab_size, tokenizer.vocab_size)

    def trace(s: int, n: int = num_requests) -> list[TraceRequest]:
        return make_prefix_trace(n, num_prefixes, prefix_len, vocab, s, turn_len, out_len, cfg.max_seq_len)

    traces = [trace(seed + 1 + rep) for rep in range(reps)]
    num_blocks = kv_blocks(traces[0], num_prefixes, prefix_len, max_num_seqs)
    engine = {"max_num_seqs": max_num_seqs, "block_size": BLOCK_SIZE, "num_blocks": num_blocks}
    print(f"[bench serve] prefix routing: model {preset} (max_seq_len {cfg.max_seq_len}), {num_prefixes} "
          f"prefixes x {prefix_len} tokens, {num_requests} requests per pass, 2 replicas per router, "
          f"{threads} thread(s) each; KV {num_blocks} blocks x {BLOCK_SIZE} = {num_blocks * BLOCK_SIZE} "
          f"tokens per replica (all prefixes: {num_prefixes * prefix_len})", flush=True)
    started = not ray.is_initialized()
    ensure_ray(num_cpus=max(4 * threads, cpus))
    urls: dict[str, str] = {}
    runs: dict[str, list[Any]] = {name: [] for name in ROUTERS}
    try:
        port = free_port()
        for i, name in enumerate(ROUTERS):
            urls[name] = deploy(ServeConfig.from_dict({
                "app_name": f"bench-prefix-{name}", "route_prefix": f"/{name}",
                "models": [{"path": str(model_dir), "name": "bench", "engine": engine, "router": name,
                            "num_cpus": threads, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}],
                "http": {"port": port}}), start_http=i == 0, log_level="WARNING")
        for name in ROUTERS:  # warm-up: connections, the first forwards, the router's tokenizer
            _pass(urls[name], trace(seed + 999, 8), 4)
        calib = _pass(urls["default"], trace(seed + 1000, max(16, num_requests // 2)), 2 * max_num_seqs)
        rate = load * calib.summary()["req_s"]
        print(f"[bench serve] default router capacity {calib.summary()['req_s']:.2f} req/s; passes arrive at "
              f"{rate:.2f} req/s ({load:g} x)", flush=True)
        for rep in range(reps):
            arrivals = with_poisson_arrivals(traces[rep], rate, seed + rep)
            for name in ROUTERS if rep % 2 == 0 else tuple(reversed(ROUTERS)):
                run = _pass(urls[name], arrivals, None)
                runs[name].append(run)
                s = _summary(run)
                print(f"[bench serve] prefix rep {rep + 1}/{reps} {name:12s}: TTFT mean "
                      f"{s['ttft_s']['mean'] or 0:.3f} s, {s['tok_s']:6.0f} output tokens/s, prefix hits "
                      f"{s['prefix_hit_rate']:.0%}, "
                      f"{s['failed']} failed", flush=True)
    finally:
        for name in urls:
            serve.delete(f"bench-prefix-{name}")
        if started:
            serve.shutdown()
            ray.shutdown()

    sums = {name: [_summary(r) for r in runs[name]] for name in ROUTERS}
    pairs = list(zip(sums["default"], sums["prefix_aware"]))  # the two passes of each repetition
    ratios = [d["ttft_s"]["mean"] / p["ttft_s"]["mean"] for d, p in pairs
              if d["ttft_s"]["mean"] and p["ttft_s"]["mean"]]
    tok_ratios = [p["tok_s"] / d["tok_s"] for d, p in pairs if d["tok_s"]]

    def spread(xs: list[float]) -> dict[str, Any]:
        return {"median": float(np.median(xs)), "min": min(xs), "max": max(xs), "runs": xs} if xs else {}

    def med(name: str, key: str, sub: str | None = None) -> float | None:
        xs = [(s[key][sub] if sub else s[key]) for s in sums[name]]
        xs = [x for x in xs if x is not None]
        return float(np.median(xs)) if xs else None

    report: dict[str, Any] = {
        "ttft_default_over_prefix": spread(ratios).get("median"),
        "ttft_mean_default_s": med("default", "ttft_s", "mean"),
        "ttft_mean_prefix_s": med("prefix_aware", "ttft_s", "mean"),
        "tok_s_default": med("default", "tok_s"), "tok_s_prefix": med("prefix_aware", "tok_s"),
        "prefix_hit_rate_default": med("default", "prefix_hit_rate"),
        "prefix_hit_rate_prefix": med("prefix_aware", "prefix_hit_rate"),
        "spread": {"ttft_ratio": spread(ratios), "tok_s_ratio": spread(tok_ratios),
                   **{f"ttft_mean_{n}": spread([s["ttft_s"]["mean"] for s in sums[n]]) for n in ROUTERS},
                   **{f"tok_s_{n}": spread([s["tok_s"] for s in sums[n]]) for n in ROUTERS}},
        "passes": sums, "failed": sum(s["failed"] for n in ROUTERS for s in sums[n]),
        "targets": {"ttft_default_over_prefix": TARGET_TTFT_RATIO, "tok_s_prefix_over_default": 1.0,
                    "failed": 0},
        "config": {"preset": preset, "max_seq_len": cfg.max_seq_len, "num_prefixes": num_prefixes,
                   "prefix_len": prefix_len, "num_requests": num_requests, "reps": reps, "load": load,
                   "rate_req_s": rate, "calibration_req_s": calib.summary()["req_s"],
                   "replicas_per_router": 2,
                   "engine": engine, "kv_tokens_per_replica": num_blocks * BLOCK_SIZE,
                   "all_prefix_tokens": num_prefixes * prefix_len, "kv_prefix_share": KV_PREFIX_SHARE,
                   "threads_per_replica": threads, "cpus": cpus, "seed": seed, "quick": quick,
                   "turn_len": turn_len, "out_len": out_len, "machine": platform.machine(),
                   "torch": torch.__version__,
                   "mean_prompt_len": float(np.mean([len(r.prompt) for t in traces for r in t]))},
    }
    print_prefix(report)
    write_json(report, out, "serve")
    return report


def print_prefix(r: dict[str, Any]) -> None:
    """The per-pass table and the headline."""
    from fastserve_ray.bench.serve import _fmt

    rows = []
    for name in ROUTERS:
        for i, s in enumerate(r["passes"][name]):
            rows.append((f"{name} rep {i + 1}", f"{s['completed']}/{s['failed']}", _fmt(s["ttft_s"]["mean"]),
                         _fmt(s["ttft_s"]["p99"]), f"{s['tok_s']:,.0f}", f"{s['prefix_hit_rate']:.0%}",
                         _fmt(s["e2e_s"]["p50"], spec=".2f"), str(s["replicas_used"])))
    print_table(("pass", "ok/failed", "TTFT mean s", "TTFT p99 s", "out tok/s", "prefix hits", "E2E p50 s",
                 "replicas"), rows)
    sp = r["spread"]
    if sp["ttft_ratio"]:
        print(f"TTFT mean, default / prefix-aware: {sp['ttft_ratio']['median']:.2f}x "
              f"({sp['ttft_ratio']['min']:.2f}-{sp['ttft_ratio']['max']:.2f}; "
              f"target >= {TARGET_TTFT_RATIO}); "
              f"output tokens/s prefix / default {sp['tok_s_ratio']['median']:.2f}x "
              f"({sp['tok_s_ratio']['min']:.2f}-{sp['tok_s_ratio']['max']:.2f}; target >= 1.0); "
              f"prefix hits {r['prefix_hit_rate_default']:.0%} vs {r['prefix_hit_rate_prefix']:.0%}; "
              f"failed {r['failed']}")
