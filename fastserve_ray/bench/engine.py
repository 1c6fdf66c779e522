"""Inference-engine benchmark: offline throughput vs Hugging Face, utilisation, online JCT fcfs vs mlfq.

Everything runs in one process on the same weights (the `bench` preset, random
init, seeded): the engine, and Hugging Face `transformers` generate on the same
model exported with `export_hf`. A seeded trace fixes prompt lengths (32-512)
and heavy-tailed output lengths (8-512); outputs ignore EOS so every request
produces exactly its trace length. Limits are probed in the same run: a GEMM
for FLOP/s (MFU) and a large copy for bandwidth (MBU).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve_ray.bench.report import print_table, write_json
from fastserve_ray.data import builtin_documents
from fastserve_ray.engine import LLMEngine, SamplingParams
from fastserve_ray.models import build_model, get_preset, num_params, save_model_dir
from fastserve_ray.models.hf import export_hf
from fastserve_ray.perf import measure_copy_bandwidth, measure_gemm_flops
from fastserve_ray.tokenizer import train_tokenizer

ONLINE_MAX_NUM_SEQS = 8
# Output lengths ~ 8 * (1 + Pareto(alpha)), clipped to 512: alpha 0.7 puts ~17% of requests above
# 100 tokens and ~5% at 512, the long jobs that block short ones under fcfs.
PARETO_ALPHA = 0.7
TARGETS = {"vs_hf_sequential": 10.0, "vs_hf_static_batch": 2.0, "mfu_b64": 0.40, "mbu_b1": 0.50,
           "jct_mean_ratio": 2.0, "jct_p99_ratio_max": 1.5}


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    prompt: list[int]
    output_len: int
    arrival: float = 0.0  # seconds after the start (online runs)


def make_trace(num: int, vocab_size: int, seed: int, min_prompt: int = 32, max_prompt: int = 512,
               min_out: int = 8, max_out: int = 512) -> list[TraceRequest]:
    """Seeded requests: uniform prompt lengths, heavy-tailed (Pareto) output lengths."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(min_prompt, max_prompt + 1, num)
    outs = np.clip((min_out * (1 + rng.pareto(PARETO_ALPHA, num))).astype(int), min_out, max_out)
    # Ids from 3 upwards: 0-2 are the special tokens of our tokenizer.
    return [TraceRequest(rng.integers(3, vocab_size, int(p)).tolist(), int(o)) for p, o in zip(prompts, outs)]


def with_poisson_arrivals(trace: list[TraceRequest], rate: float, seed: int) -> list[TraceRequest]:
    """The same requests arriving as a Poisson process of ``rate`` requests/s."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(trace))
    times = np.cumsum(gaps) - gaps[0]
    return [dataclasses.replace(r, arrival=float(t)) for r, t in zip(trace, times)]


def _params(r: TraceRequest) -> SamplingParams:
    return SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)


def engine_offline(engine: LLMEngine, trace: list[TraceRequest]) -> float:
    """Output tokens/s of one offline batch through the engine."""
    t0 = time.perf_counter()
    outputs = engine.generate([r.prompt for r in trace], [_params(r) for r in trace])
    elapsed = time.perf_counter() - t0
    assert [o.num_output_tokens for o in outputs] == [r.output_len for r in trace]
    return sum(r.output_len for r in trace) / elapsed


@torch.no_grad()
def hf_sequential(hf_model, trace: list[TraceRequest]) -> float:
    """Output tokens/s of transformers' generate, one request at a time (greedy, KV cache)."""
    t0 = time.perf_counter()
    for r in trace:
        ids = torch.tensor([r.prompt])
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.output_len,
                          min_new_tokens=r.output_len, do_sample=False, pad_token_id=0)
    return sum(r.output_len for r in trace) / (time.perf_counter() - t0)


@torch.no_grad()
def hf_static_batch(hf_model, trace: list[TraceRequest]) -> float:
    """Useful output tokens/s of one left-padded static batch: it runs until the longest output."""
    width = max(len(r.prompt) for r in trace)
    ids = torch.zeros((len(trace), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(trace):
        ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[i, width - len(r.prompt):] = 1
    longest = max(r.output_len for r in trace)
    t0 = time.perf_counter()
    hf_model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                      do_sample=False, pad_token_id=0)
    return sum(r.output_len for r in trace) / (time.perf_counter() - t0)


def decode_step_seconds(engine: LLMEngine, batch: int, prompt_len: int, steps: int, vocab: int) -> float:
    """Median wall time of engine steps in which ``batch`` sequences all decode."""
    rng = np.random.default_rng(0)
    for _ in range(batch):
        prompt = rng.integers(3, vocab, prompt_len).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
    times: list[float] = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        decoding = [o for o in outs if len(o.new_token_ids) == 1 and o.num_output_tokens > 1]
        if len(decoding) == batch and not any(o.finished for o in outs):
            times.append(dt)
    return statistics.median(times)


def steady_state_capacity(engine: LLMEngine, trace: list[TraceRequest], vocab: int) -> float:
    """Requests/s the engine sustains with a full batch: per request, its prefill tokens at the
    measured prefill cost plus its output tokens at a full batch's per-token decode cost."""
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, vocab, 512).tolist()
    engine.generate([prompt], [SamplingParams(max_tokens=1, ignore_eos=True)])  # warm-up
    t0 = time.perf_counter()
    engine.generate([prompt], [SamplingParams(max_tokens=1, ignore_eos=True)])
    prefill_per_token = (time.perf_counter() - t0) / len(prompt)
    batch = engine.config.max_num_seqs
    decode_per_token = decode_step_seconds(engine, batch, 256, 16, vocab) / batch
    cost = [len(r.prompt) * prefill_per_token + r.output_len * decode_per_token for r in trace]
    return 1.0 / statistics.mean(cost)


def online(engine: LLMEngine, trace: list[TraceRequest]) -> dict[str, list[float]]:
    """Replay arrivals in wall-clock time; per-request JCT, TTFT and TPOT in seconds.

    Times count from each request's *scheduled* arrival, so time spent waiting for the
    loop to come round (queueing) is charged as it would be for a real client.
    The engine must use ``time.perf_counter`` as its clock.
    """
    pending = sorted(trace, key=lambda r: r.arrival)
    arrival_of: dict[str, float] = {}
    done = []
    t0 = time.perf_counter()
    i = 0
    while i < len(pending) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(pending) and pending[i].arrival <= now:
            rid = engine.add_request(pending[i].prompt, _params(pending[i]))
            arrival_of[rid] = t0 + pending[i].arrival
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[i].arrival - (time.perf_counter() - t0)))
            continue
        done.extend(out for out in engine.step() if out.finished)
    return {
        "jct": [o.metrics.finish_time - arrival_of[o.request_id] for o in done],
        "ttft": [o.metrics.first_token_time - arrival_of[o.request_id] for o in done],
        "tpot": [o.time_per_output_token for o in done if o.time_per_output_token is not None],
    }


def _p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99))


def plot_jct_cdf(results: dict[str, dict[str, list[float]]], path: Path) -> None:
    """JCT CDF per policy as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for policy, r in results.items():
        xs = np.sort(r["jct"])
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=f"{policy} (mean {np.mean(xs):.2f}s)")
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_xscale("log")
    ax.set_title("online JCT, Poisson arrivals, bench preset")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_engine_bench(out: Path | None = None, preset: str = "bench", num_requests: int = 64,
                     hf_sequential_requests: int = 16, online_requests: int = 96, load: float = 0.9,
                     seed: int = 0) -> dict[str, Any]:
    """Run every measurement; write JSON (+ a JCT CDF PNG next to it) and print a table."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    cfg = get_preset(preset)
    print(f"[bench engine] model {preset}: random weights, seed {seed}")
    texts = (d.text for d in builtin_documents("docs"))
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    model_dir = save_model_dir(work / "model", model, tokenizer)
    export_hf(model_dir, work / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(work / "hf").eval()

    gemm = measure_gemm_flops("cpu", torch.float32, size=1024)
    bandwidth = measure_copy_bandwidth("cpu")
    print(f"[bench engine] GEMM {gemm / 1e9:.1f} GFLOP/s, copy {bandwidth / 1e9:.1f} GB/s")

    trace = make_trace(num_requests, cfg.vocab_size, seed)
    engine = LLMEngine(model, tokenizer, policy="fcfs", max_num_seqs=64, max_num_batched_tokens=2048)
    print(f"[bench engine] offline: {num_requests} requests through the engine")
    engine_tok_s = engine_offline(engine, trace)
    print(f"[bench engine] offline: HF sequential ({hf_sequential_requests} requests)")
    hf_seq = hf_sequential(hf_model, trace[:hf_sequential_requests])
    print(f"[bench engine] offline: HF static batch of {num_requests}")
    hf_static = hf_static_batch(hf_model, trace)

    print("[bench engine] utilisation: decode at batch 64 and batch 1")
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    matmul_params = num_params(model, non_embedding=True) + cfg.dim * cfg.vocab_size
    step_b64 = decode_step_seconds(engine, 64, 64, 16, cfg.vocab_size)
    step_b1 = decode_step_seconds(engine, 1, 64, 32, cfg.vocab_size)
    mfu_b64 = 2 * matmul_params * 64 / step_b64 / gemm
    mbu_b1 = weights_bytes / step_b1 / bandwidth

    # Online: a memory-bound deployment, where the batch cannot hold every request (FastServe's
    # setting: with room for all, fcfs never blocks and the policy hardly matters). The arrival
    # rate is `load` x the capacity measured for this trace at these settings.
    online_kw = dict(max_num_seqs=ONLINE_MAX_NUM_SEQS, max_num_batched_tokens=512, clock=time.perf_counter)
    online_base = make_trace(online_requests, cfg.vocab_size, seed + 1)
    mean_out = statistics.mean(r.output_len for r in trace)
    capacity = steady_state_capacity(LLMEngine(model, tokenizer, policy="fcfs", **online_kw),
                                     online_base, cfg.vocab_size)
    rate = load * capacity
    online_trace = with_poisson_arrivals(online_base, rate, seed)
    results = {}
    for policy in ("fcfs", "mlfq"):
        print(f"[bench engine] online: {online_requests} requests at {rate:.2f} req/s "
              f"(capacity {capacity:.2f}), batch <= {ONLINE_MAX_NUM_SEQS}, policy {policy}")
        results[policy] = online(LLMEngine(model, tokenizer, policy=policy, **online_kw), online_trace)
    f, m = results["fcfs"], results["mlfq"]
    report: dict[str, Any] = {
        "engine_tok_s": engine_tok_s, "hf_sequential_tok_s": hf_seq, "hf_static_batch_tok_s": hf_static,
        "ratio_vs_hf_sequential": engine_tok_s / hf_seq, "ratio_vs_hf_static_batch": engine_tok_s / hf_static,
        "gemm_gflops": gemm / 1e9, "mem_gbps": bandwidth / 1e9, "mfu_b64": mfu_b64, "mbu_b1": mbu_b1,
        "decode_step_ms_b64": step_b64 * 1e3, "decode_step_ms_b1": step_b1 * 1e3,
        "jct_mean_fcfs": float(np.mean(f["jct"])), "jct_mean_mlfq": float(np.mean(m["jct"])),
        "jct_p99_fcfs": _p99(f["jct"]), "jct_p99_mlfq": _p99(m["jct"]),
        "ttft_mean_fcfs": float(np.mean(f["ttft"])), "ttft_mean_mlfq": float(np.mean(m["ttft"])),
        "tpot_mean_fcfs": float(np.mean(f["tpot"])), "tpot_mean_mlfq": float(np.mean(m["tpot"])),
        "online_rate_req_s": rate, "online_capacity_req_s": capacity,
        "online_max_num_seqs": ONLINE_MAX_NUM_SEQS, "targets": TARGETS,
        "config": {"preset": preset, "params": num_params(model), "num_requests": num_requests,
                   "hf_sequential_requests": hf_sequential_requests, "online_requests": online_requests,
                   "load": load, "seed": seed, "mean_output_len": mean_out, "cpus": os.cpu_count(),
                   "machine": platform.machine(), "torch": torch.__version__, "device": "cpu"},
    }
    _print(report)
    if out is not None:
        plot_jct_cdf(results, out.with_name(out.stem + "_jct_cdf.png"))
    write_json(report, out, "engine")
    return report


def _print(r: dict[str, Any]) -> None:
    rows = [
        ("engine (continuous batching, 64)", f"{r['engine_tok_s']:,.0f}", "tokens/s", ""),
        ("HF generate, sequential", f"{r['hf_sequential_tok_s']:,.0f}", "tokens/s",
         f"engine {r['ratio_vs_hf_sequential']:.1f}x (target >= {TARGETS['vs_hf_sequential']:g}x)"),
        ("HF generate, static batch 64", f"{r['hf_static_batch_tok_s']:,.0f}", "tokens/s",
         f"engine {r['ratio_vs_hf_static_batch']:.1f}x (target >= {TARGETS['vs_hf_static_batch']:g}x)"),
        ("decode MFU, batch 64", f"{r['mfu_b64']:.1%}", "", f"target >= {TARGETS['mfu_b64']:.0%}"),
        ("decode MBU, batch 1", f"{r['mbu_b1']:.1%}", "", f"target >= {TARGETS['mbu_b1']:.0%}"),
        ("JCT mean fcfs / mlfq", f"{r['jct_mean_fcfs']:.2f} / {r['jct_mean_mlfq']:.2f}", "s",
         f"{r['jct_mean_fcfs'] / r['jct_mean_mlfq']:.2f}x (target >= {TARGETS['jct_mean_ratio']:g}x)"),
        ("JCT p99 fcfs / mlfq", f"{r['jct_p99_fcfs']:.2f} / {r['jct_p99_mlfq']:.2f}", "s",
         f"mlfq/fcfs {r['jct_p99_mlfq'] / r['jct_p99_fcfs']:.2f} "
         f"(target <= {TARGETS['jct_p99_ratio_max']:g})"),
        ("TTFT mean fcfs / mlfq", f"{r['ttft_mean_fcfs']:.2f} / {r['ttft_mean_mlfq']:.2f}", "s", ""),
        ("TPOT mean fcfs / mlfq", f"{r['tpot_mean_fcfs'] * 1e3:.0f} / {r['tpot_mean_mlfq'] * 1e3:.0f}", "ms",
         ""),
    ]
    print_table(("measurement", "value", "unit", "comparison"), rows)
    print(f"GEMM {r['gemm_gflops']:.1f} GFLOP/s, copy {r['mem_gbps']:.1f} GB/s")
