"""Serving benchmark, in the spirit of `vllm bench serve`: one seeded trace over HTTP vs in process.

The same requests (token-id prompts, greedy, EOS ignored so every request produces exactly its
trace length) go (1) through ``AsyncLLMEngine`` in this process and over HTTP through Ray Serve
to one replica with the same engine options and threads, (2) behind the router front
(``ingress: router``, the default) and (3) with the replica answering HTTP itself
(``ingress: direct``), both with the engine loop in a child process of the replica (the
default), and (4) direct again with the engine loop as a thread of the replica
(``engine_process: false``), all at a fixed concurrency and interleaved over ``reps`` repetitions so
that drift in machine load hits every side alike (median and spread reported); then over HTTP
again with Poisson arrivals. Streaming clients time TTFT, inter-token latency
(ITL), TPOT and end-to-end latency. Last, a 1..2-replica deployment under load measures the
autoscaler's reaction: load start to the second replica answering.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve_ray.bench.report import print_table, write_json
from fastserve_ray.bench.trace import TraceRequest, make_trace, with_poisson_arrivals

TARGET_HTTP_RATIO = 0.8  # http_tok_s >= 0.8 x inprocess_tok_s through one replica
PREFIX_REQUESTS = 96  # `--only prefix`: requests per pass (12 per prefix)


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(xs)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


class Run:
    """Per-request timings of one pass: start, first token, token times, end, ok."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.t0 = self.t1 = 0.0

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.records if r["ok"]]
        wall = self.t1 - self.t0
        out_tokens = sum(r["tokens"] for r in ok)
        itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
        tpot = [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
        return {"completed": len(ok), "failed": len(self.records) - len(ok), "wall_s": wall,
                "req_s": len(ok) / wall if wall else 0.0, "tok_s": out_tokens / wall if wall else 0.0,
                "ttft_s": _stats([r["times"][0] - r["start"] for r in ok if r["times"]]),
                "tpot_s": _stats(tpot), "itl_s": _stats(itl),
                "e2e_s": _stats([r["end"] - r["start"] for r in ok])}


async def _drive(trace: list[TraceRequest], one: Any, concurrency: int | None) -> Run:
    """Send the trace: ``concurrency`` workers back to back, or at the trace's arrival times."""
    run = Run()
    run.t0 = time.perf_counter()
    if concurrency:
        queue = list(reversed(trace))

        async def worker() -> None:
            while queue:
                run.records.append(await one(queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        async def delayed(r: TraceRequest) -> None:
            await asyncio.sleep(max(0.0, run.t0 + r.arrival - time.perf_counter()))
            run.records.append(await one(r))

        await asyncio.gather(*(delayed(r) for r in trace))
    run.t1 = time.perf_counter()
    return run


def inprocess_pass(engine: Any, trace: list[TraceRequest], concurrency: int) -> Run:
    """The trace through an AsyncLLMEngine in this process (after a short warm-up)."""
    from fastserve_ray.engine import SamplingParams

    async def one(r: TraceRequest) -> dict[str, Any]:
        start = time.perf_counter()
        times, tokens = [], 0
        params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(r.prompt, params):
            now = time.perf_counter()
            times.extend([now] * len(out.new_token_ids))
            tokens = out.num_output_tokens  # not len(out.token_ids): that copies the history
        return {"ok": tokens == r.output_len, "tokens": tokens, "start": start, "times": times,
                "end": time.perf_counter()}

    async def main() -> Run:
        await _drive(trace[: min(4, len(trace))], one, 2)  # warm-up, as the HTTP side gets
        return await _drive(trace, one, concurrency)

    return asyncio.run(main())


async def sse_chunks(resp: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of a streamed OpenAI response (``data: ...`` lines, up to ``[DONE]``)."""
    async for line in resp.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def http_pass(url: str, model: str, trace: list[TraceRequest], concurrency: int | None) -> Run:
    """The trace over HTTP (streaming /v1/completions), every response checked."""
    import httpx

    async def main() -> Run:
        limits = httpx.Limits(max_connections=max(64, concurrency or 0))
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            async def one(r: TraceRequest) -> dict[str, Any]:
                body = {"model": model, "prompt": r.prompt, "max_tokens": r.output_len, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                start = time.perf_counter()
                times: list[float] = []
                usage = None
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as resp:
                        if resp.status_code != 200:
                            await resp.aread()
                            return {"ok": False, "tokens": 0, "start": start, "times": [],
                                    "end": time.perf_counter(), "status": resp.status_code}
                        async for chunk in sse_chunks(resp):
                            if chunk.get("usage"):
                                usage = chunk["usage"]
                            elif chunk.get("choices") and chunk["choices"][0].get("text"):
                                times.append(time.perf_counter())
                except httpx.HTTPError:
                    return {"ok": False, "tokens": 0, "start": start, "times": [], "end": time.perf_counter()}
                tokens = usage["completion_tokens"] if usage else 0
                # Chunks carry text; a chunk whose tokens hold no complete character yet is merged
                # into the next, so token times are spread over the chunks that arrived.
                times = times if len(times) == tokens else np.interp(
                    np.linspace(0, 1, tokens), np.linspace(0, 1, len(times)), times).tolist() if times else []
                return {"ok": tokens == r.output_len, "tokens": tokens, "start": start, "times": times,
                        "end": time.perf_counter()}

            await _drive(trace[: min(4, len(trace))], one, 2)  # warm-up: connections, first forward
            return await _drive(trace, one, concurrency)

    return asyncio.run(main())


def autoscale_reaction(model_dir: Path, engine_options: dict[str, Any], trace: list[TraceRequest],
                       concurrency: int, port: int, timeout_s: float = 180.0) -> float | None:
    """Seconds from load start until a second replica answers; None if it never does in time."""
    import httpx
    from ray import serve

    from fastserve_ray.serve.command import deploy
    from fastserve_ray.serve.config import ServeConfig

    cfg = ServeConfig.from_dict({"app_name": "bench-autoscale", "models": [{
        "path": str(model_dir), "name": "bench", "engine": engine_options, "num_cpus": 1,
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1.0,
                        "metrics_interval_s": 0.5, "look_back_period_s": 2.0}}],
        "http": {"port": port}})
    url = deploy(cfg, start_http=False)  # Serve's proxy is already up on `port`
    seen: set[str] = set()
    reaction: list[float] = []

    async def main() -> None:
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            async def worker(i: int) -> None:
                k = i
                while not reaction and time.perf_counter() - t0 < timeout_s:
                    r = trace[k % len(trace)]
                    k += concurrency
                    resp = await client.post("/v1/completions", json={
                        "model": "bench", "prompt": r.prompt, "max_tokens": r.output_len, "ignore_eos": True})
                    if resp.status_code == 200:
                        seen.add(resp.json().get("system_fingerprint"))
                        if len(seen) >= 2 and not reaction:
                            reaction.append(time.perf_counter() - t0)

            await asyncio.gather(*(worker(i) for i in range(concurrency)))

    try:
        asyncio.run(main())
    finally:
        serve.delete(cfg.app_name)
    return reaction[0] if reaction else None


def plot_latency_cdf(runs: dict[str, Run], path: Path) -> None:
    """End-to-end latency CDF per pass as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, run in runs.items():
        xs = np.sort([r["end"] - r["start"] for r in run.records if r["ok"]])
        if len(xs):
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=f"{name} (p50 {np.median(xs):.2f}s)")
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("serving latency: in process vs HTTP through Ray Serve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _median_run(runs: list[Run]) -> tuple[Run, dict[str, Any]]:
    """The repetition with the median throughput, and the spread of all of them."""
    ranked = sorted(runs, key=lambda r: r.summary()["tok_s"])
    rates = [r.summary()["tok_s"] for r in ranked]
    return ranked[len(ranked) // 2], {"median": float(np.median(rates)), "min": rates[0], "max": rates[-1],
                                      "runs": rates}


def bench_model(preset: str, seed: int, num_requests: int, max_out: int) -> tuple[Any, Any, Path, list]:
    """A seeded random-weight model directory of ``preset`` and the seeded trace for it."""
    from fastserve_ray.data import builtin_documents
    from fastserve_ray.models import build_model, get_preset, save_model_dir
    from fastserve_ray.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    cfg = get_preset(preset)
    tokenizer = train_tokenizer((d.text for d in builtin_documents("docs")), vocab_size=cfg.vocab_size)
    torch.manual_seed(seed)
    model_dir = save_model_dir(work / "model", build_model(cfg), tokenizer)
    trace = make_trace(num_requests, min(cfg.vocab_size, tokenizer.vocab_size), seed, min_prompt=16,
                       max_prompt=min(128, cfg.max_seq_len // 2), min_out=8, max_out=max_out)
    return cfg, tokenizer, model_dir, trace


def _structured(engine: Any, cfg: Any, tokenizer: Any, trace: list, concurrency: int, reps: int) -> dict:
    from fastserve_ray.bench.structured import (
        run_structured_bench,
        schema_compile_seconds,
        twenty_field_schema,
    )

    print(f"[bench serve] structured outputs: a 20-field json_schema vs the same requests free, "
          f"concurrency {concurrency}")
    max_tokens = min(400, cfg.max_seq_len - max(len(r.prompt) for r in trace))
    result = run_structured_bench(engine, trace, concurrency, reps, max_tokens)
    return result | schema_compile_seconds(tokenizer, cfg.vocab_size, twenty_field_schema())


def _structured_only(out: Path | None, cfg: Any, tokenizer: Any, model_dir: Path, trace: list,
                     engine_options: dict[str, Any], concurrency: int, reps: int,
                     config: dict[str, Any]) -> dict[str, Any]:
    """`bench serve --only structured`: the structured-output pass alone (no Ray)."""
    from fastserve_ray.bench.structured import print_structured
    from fastserve_ray.engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_model_dir(model_dir, **engine_options)
    try:
        structured = _structured(engine, cfg, tokenizer, trace, concurrency, reps)
    finally:
        engine.shutdown()
    report = {**_structured_keys(structured), "structured": structured,
              "config": config | {"concurrency": concurrency, "reps": reps, "only": "structured"}}
    print_structured(structured)
    write_json(report, out, "serve")
    return report


def _structured_keys(structured: dict[str, Any]) -> dict[str, Any]:
    return {k: structured[k] for k in ("structured_tok_s", "plain_tok_s", "structured_vs_plain",
                                       "schema_compile_s")}


def run_serve_bench(out: Path | None = None, preset: str = "small", num_requests: int = 64,
                    concurrency: int = 8, load: float = 0.8, seed: int = 0,
                    quick: bool = False, reps: int = 3, only: str | None = None) -> dict[str, Any]:
    """Build a seeded model, run every pass, print the table, write JSON (+ a latency CDF PNG).

    ``only="structured"``: just the structured-output comparison (in process, no Ray).
    ``only="prefix"``: just prefix-aware routing vs Serve's default router (bench/prefix.py).
    """
    if only == "prefix":
        from fastserve_ray.bench.prefix import run_prefix_bench

        return run_prefix_bench(out, preset=preset, quick=quick, reps=reps, num_requests=num_requests,
                                seed=seed)
    import ray
    from ray import serve

    from fastserve_ray.cluster import ensure_ray
    from fastserve_ray.engine import AsyncLLMEngine
    from fastserve_ray.serve.command import deploy, free_port
    from fastserve_ray.serve.config import ModelOptions, ServeConfig

    cpus = os.cpu_count() or 1
    threads = max(1, cpus - 2)  # the same for the replica and in process; the rest for proxy/clients
    torch.set_num_threads(threads)
    print(f"[bench serve] model {preset}: random weights, seed {seed}; {num_requests} requests, "
          f"concurrency {concurrency}, {threads} threads per engine, {reps} interleaved repetitions")
    max_out = 32 if quick else 128
    cfg, tokenizer, model_dir, trace = bench_model(preset, seed, num_requests, max_out)
    engine_options = {"max_num_seqs": concurrency}
    if only == "structured":
        return _structured_only(out, cfg, tokenizer, model_dir, trace, engine_options, concurrency, reps,
                                {"preset": preset, "num_requests": num_requests, "seed": seed, "cpus": cpus,
                                 "engine_threads": threads, "machine": platform.machine(),
                                 "torch": torch.__version__, "quick": quick})
    stream_interval_ms = ModelOptions(path=str(model_dir)).stream_interval_ms  # the serving default

    started = not ray.is_initialized()
    ensure_ray(num_cpus=max(4, cpus))
    engine = AsyncLLMEngine.from_model_dir(model_dir, **engine_options)
    passes: dict[str, list[Run]] = {"inprocess": [], "router": [], "direct": [], "direct_thread": []}
    try:
        port = free_port()
        urls = {}
        # All deployed at once, each its own replica and prefix. "direct_thread" is direct with
        # the engine loop as a thread of the replica (engine_process: false), the layout before
        # the engine got a process of its own: the measured effect of that split.
        for name, mode, in_process in (("router", "router", True), ("direct", "direct", True),
                                       ("direct_thread", "direct", False)):
            urls[name] = deploy(ServeConfig.from_dict({
                "app_name": f"bench-{name}", "route_prefix": f"/{name}", "ingress": mode,
                "models": [{"path": str(model_dir), "name": "bench", "engine": engine_options,
                            "engine_process": in_process, "num_cpus": threads,
                            "autoscaling": {"min_replicas": 1, "max_replicas": 1}}],
                "http": {"port": port}}), start_http=name == "router")
        for rep in range(reps):
            for name in passes:
                run = (inprocess_pass(engine, trace, concurrency) if name == "inprocess"
                       else http_pass(urls[name], "bench", trace, concurrency))
                passes[name].append(run)
                s = run.summary()
                print(f"[bench serve] rep {rep + 1}/{reps} {name:13s}: {s['tok_s']:6.0f} output tokens/s, "
                      f"TPOT {s['tpot_s']['mean'] * 1e3:.1f} ms, {s['failed']} failed")
        inproc, inproc_spread = _median_run(passes["inprocess"])
        http, http_spread = _median_run(passes["router"])
        direct, direct_spread = _median_run(passes["direct"])
        direct_thread, thread_spread = _median_run(passes["direct_thread"])
        rate = load * inproc.summary()["req_s"]
        print(f"[bench serve] HTTP router: Poisson arrivals at {rate:.2f} req/s "
              f"({load:g} x in-process capacity)")
        poisson = http_pass(urls["router"], "bench", with_poisson_arrivals(trace, rate, seed), None)
        structured = _structured(engine, cfg, tokenizer, trace, concurrency, reps)
        for name in urls:
            serve.delete(f"bench-{name}")
        print("[bench serve] autoscaling: load on a 1..2-replica deployment until the second answers")
        reaction = autoscale_reaction(model_dir, engine_options, trace, 2 * concurrency, port,
                                      timeout_s=90.0 if quick else 180.0)
        print(f"[bench serve]   second replica answering after {reaction}s")
    finally:
        engine.shutdown()
        serve.shutdown()
        if started:
            ray.shutdown()

    inproc_sum, http_sum, direct_sum, thread_sum, poisson_sum = (
        r.summary() for r in (inproc, http, direct, direct_thread, poisson))
    failed = sum(r.summary()["failed"] for runs in passes.values() for r in runs) + poisson_sum["failed"]
    base = inproc_spread["median"]
    report: dict[str, Any] = {
        "http_tok_s": http_spread["median"], "http_direct_tok_s": direct_spread["median"],
        "inprocess_tok_s": base,
        "http_vs_inprocess": http_spread["median"] / base if base else None,
        "http_direct_vs_inprocess": direct_spread["median"] / base if base else None,
        "http_direct_thread_vs_inprocess": thread_spread["median"] / base if base else None,
        "failed": failed, "ttft_p50_s": http_sum["ttft_s"]["p50"], "ttft_p99_s": http_sum["ttft_s"]["p99"],
        "e2e_p99_s": http_sum["e2e_s"]["p99"], "autoscale_reaction_s": reaction,
        "spread_tok_s": {"inprocess": inproc_spread, "router": http_spread, "direct": direct_spread,
                         "direct_thread": thread_spread},
        "http_fixed": http_sum, "http_direct_fixed": direct_sum, "http_direct_thread_fixed": thread_sum,
        "http_poisson": poisson_sum | {"rate_req_s": rate}, "inprocess": inproc_sum,
        **_structured_keys(structured), "structured": structured,
        "targets": {"http_vs_inprocess": TARGET_HTTP_RATIO, "failed": 0,
                    "structured_vs_plain": structured["target"]},
        "config": {"preset": preset, "num_requests": num_requests, "concurrency": concurrency, "load": load,
                   "seed": seed, "max_output_len": max_out, "engine_threads": threads, "cpus": cpus,
                   "reps": reps, "stream_interval_ms": stream_interval_ms,
                   "machine": platform.machine(), "torch": torch.__version__, "quick": quick,
                   "mean_output_len": float(np.mean([r.output_len for r in trace]))},
    }
    _print(report)
    from fastserve_ray.bench.structured import print_structured

    print_structured(structured)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_latency_cdf({"in process": inproc, "HTTP router": http, "HTTP direct": direct,
                          "HTTP direct, engine thread": direct_thread,
                          "HTTP router, Poisson": poisson}, out.with_name(out.stem + "_latency_cdf.png"))
    write_json(report, out, "serve")
    return report


def _fmt(x: float | None, scale: float = 1.0, spec: str = ".3f") -> str:
    return "-" if x is None else format(x * scale, spec)


def _print(r: dict[str, Any]) -> None:
    rows = []
    passes = (("in process (AsyncLLMEngine)", r["inprocess"]),
              ("HTTP router, fixed concurrency", r["http_fixed"]),
              ("HTTP direct, fixed concurrency", r["http_direct_fixed"]),
              ("HTTP direct, engine thread in replica", r["http_direct_thread_fixed"]),
              ("HTTP router, Poisson arrivals", r["http_poisson"]))
    for name, s in passes:
        rows.append((name, f"{s['completed']}/{s['failed']}", f"{s['req_s']:.2f}", f"{s['tok_s']:,.0f}",
                     f"{_fmt(s['ttft_s']['p50'])} / {_fmt(s['ttft_s']['p99'])}",
                     f"{_fmt(s['tpot_s']['mean'], 1e3, '.1f')}", f"{_fmt(s['itl_s']['p99'], 1e3, '.1f')}",
                     f"{_fmt(s['e2e_s']['p50'])} / {_fmt(s['e2e_s']['p99'])}"))
    print_table(("pass", "ok/failed", "req/s", "out tok/s", "TTFT p50/p99 s", "TPOT ms", "ITL p99 ms",
                 "E2E p50/p99 s"), rows)
    sp = r["spread_tok_s"]
    print("output tokens/s, median (min-max) of the repetitions: " + "; ".join(
        f"{k} {v['median']:.0f} ({v['min']:.0f}-{v['max']:.0f})" for k, v in sp.items()))
    print(f"HTTP / in-process throughput: router {_fmt(r['http_vs_inprocess'], 1, '.2f')}, direct "
          f"{_fmt(r['http_direct_vs_inprocess'], 1, '.2f')} (target >= {TARGET_HTTP_RATIO}), direct with "
          f"the engine as a replica thread {_fmt(r['http_direct_thread_vs_inprocess'], 1, '.2f')}; "
          f"failed {r['failed']} (target 0); autoscale reaction {_fmt(r['autoscale_reaction_s'], 1, '.1f')}s")


def run_serve_bench_from_args(args: Any) -> dict[str, Any]:
    """`fastserve-ray bench serve`: --quick is a tiny smoke run; --requests sets the trace size."""
    quick = bool(getattr(args, "quick", False))
    if getattr(args, "only", None) == "cold-start":  # bench/cold_start.py: presets x (local, s3)
        from fastserve_ray.bench.cold_start import run_cold_start_bench

        presets = (args.preset,) if args.preset else (("tiny",) if quick else ("small", "bench"))
        return run_cold_start_bench(args.out, presets=presets, reps=1 if quick else 3)
    if getattr(args, "only", None) == "prefix":
        # Its own defaults: the prefixes must fit the context (bench: 1024 tokens, small: 512),
        # and a pass needs many requests per prefix (32, the CLI's serve default, is too few).
        preset = args.preset or ("small" if quick else "bench")
        requests = 24 if quick else (PREFIX_REQUESTS if args.requests == 32 else args.requests)
        return run_serve_bench(args.out, preset=preset, num_requests=requests, quick=quick,
                               reps=1 if quick else 3, only="prefix")
    preset = args.preset or ("tiny" if quick else "small")
    requests = 16 if quick and args.requests == 64 else args.requests
    return run_serve_bench(args.out, preset=preset, num_requests=requests, quick=quick,
                           concurrency=4 if quick else 8, reps=1 if quick else 3,
                           only=getattr(args, "only", None))
