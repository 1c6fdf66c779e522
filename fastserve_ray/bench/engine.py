"""Inference-engine benchmark: offline throughput vs Hugging Face, step rooflines, MLFQ vs FCFS under load.

Fair by construction:
  * one process, the same weights (the `bench` preset, random init, seeded) in the same dtype
    on both sides: the engine, and Hugging Face `transformers` generate on the model exported
    with `export_hf`; the same requests (a seeded trace: prompts 32-512 tokens, heavy-tailed
    outputs 8-512 that ignore EOS, so every request produces exactly its trace length);
  * the glibc allocator tuning the engine relies on is applied deliberately, before anything
    runs, so it helps both sides alike; both use every core;
  * each side is warmed up (untimed) first, then every configuration runs ``reps`` times,
    interleaved; the median and the spread (min, max) are reported;
  * HF static batching is best-configured: prompts sorted by length (less padding) and the
    faster of two batch sizes;
  * probes measured once per run (GEMM in fp32 and bf16, copy, read-only bandwidth) give the
    roofline: a decode step's floor is FLOPs / GEMM + bytes (weights + K/V) / read bandwidth,
    and the trace's floor sums that over an ideal continuous-batching schedule.
Online (online_sweep.py): fcfs vs mlfq (and fcfs-swap where memory is scarce) swept over
load (fractions of the capacity measured with a standing queue) in three deployment shapes,
several seeds per point, JCT and TTFT; a JCT-vs-load PNG next to the JSON. The top-level JCT
keys are the kv-bound scenario's at its knee, the lowest load where fcfs starts to queue (mean
TTFT three times the lightest load's). The memory-bound shapes are also replayed in the
scheduling simulator (schedule_sim.py), with an srpt-oracle reference, labelled as a model.

Sized to finish in under 40 minutes on a 2-vCPU machine (24 offline requests with outputs up
to 256 tokens, 3 interleaved repetitions; online, 36 kv-bound runs of 96 requests, 9 overload
runs of 192 and 24 slot-bound runs of 48, ~30 minutes of it, because a queue needs a run long
enough to build); every part prints its progress and wall time, and the remaining time is
estimated as soon as the first repetition and the capacity are measured.
``compile=True`` adds the engine with ``engine.compile`` (compiled decode steps) as one more
interleaved configuration, plus its decode steps and start-up time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve_ray.bench.online_sweep import SCENARIOS, plot_jct_vs_load, run_scenarios, scenario_trace
from fastserve_ray.bench.report import Progress, print_table, write_json
from fastserve_ray.bench.schedule_sim import SimShape, StepCost, simulate_sweep, simulated_capacity
from fastserve_ray.bench.trace import TraceRequest, make_trace, trace_params
from fastserve_ray.config import ModelConfig
from fastserve_ray.data import builtin_documents
from fastserve_ray.device import default_device, resolve_dtype
from fastserve_ray.engine import LLMEngine, SamplingParams
from fastserve_ray.models import build_model, get_preset, num_params, save_model_dir
from fastserve_ray.models.hf import export_hf
from fastserve_ray.perf import measure_copy_bandwidth, measure_gemm_flops, tune_cpu_allocator
from fastserve_ray.tokenizer import train_tokenizer

# Default sizes (see the module docstring). HF static batching runs each padded batch until its
# longest output, so the offline outputs are capped at 256: with 512-token outputs one
# repetition took ~4.5 minutes on the 2-vCPU machine, most of it in HF's padded batches.
OFFLINE_REQUESTS = 24
OFFLINE_MAX_OUT = 256
TARGETS = {"vs_hf_sequential": 5.0, "vs_hf_static_batch": 5.0, "of_roofline": 0.5,
           "step_roofline_ratio": 1 / 2.5, "mbu_b1": 0.50, "jct_mean_ratio": 2.0,
           "jct_p99_ratio_max": 1.5, "jct_gain_captured": 0.6}
STEP_CONTEXT = 420  # tokens of context in the decode-step measurements
SIM_SEEDS = 10  # seeds per scenario in the scheduling simulator (deterministic, ~0.3 s a run)
HF_STATIC_BATCH_SIZES = (16, 64)


def engine_offline(engine: LLMEngine, trace: list[TraceRequest]) -> float:
    """Output tokens/s of one offline batch through the engine."""
    t0 = time.perf_counter()
    outputs = engine.generate([r.prompt for r in trace], [trace_params(r) for r in trace])
    elapsed = time.perf_counter() - t0
    assert [o.num_output_tokens for o in outputs] == [r.output_len for r in trace]
    return sum(r.output_len for r in trace) / elapsed


@torch.no_grad()
def hf_sequential(hf_model, trace: list[TraceRequest]) -> float:
    """Output tokens/s of transformers' generate, one request at a time (greedy, KV cache)."""
    t0 = time.perf_counter()
    for r in trace:
        ids = torch.tensor([r.prompt], device=hf_model.device)
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.output_len,
                          min_new_tokens=r.output_len, do_sample=False, pad_token_id=0)
    return sum(r.output_len for r in trace) / (time.perf_counter() - t0)


@torch.no_grad()
def hf_static_batch(hf_model, trace: list[TraceRequest], batch_size: int | None = None) -> float:
    """Useful output tokens/s of left-padded static batches (prompts sorted by length, less
    padding); each batch runs until its longest output."""
    ordered = sorted(trace, key=lambda r: len(r.prompt))
    size = batch_size or len(ordered)
    t0 = time.perf_counter()
    for start in range(0, len(ordered), size):
        batch = ordered[start:start + size]
        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        longest = max(r.output_len for r in batch)
        ids, mask = ids.to(hf_model.device), mask.to(hf_model.device)
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


def _summary(xs: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": list(xs)}


def measure_read_bandwidth(device: torch.device | str = "cpu", num_bytes: int = 1 << 28,
                           repeats: int = 5) -> float:
    """Best-of-``repeats`` bytes/s of a read-only pass (a sum) over a large tensor."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    float(x.sum())  # warm-up; float() waits for a device to finish
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(x.sum())
        best = max(best, num_bytes / (time.perf_counter() - t0))
    return best


@dataclasses.dataclass(frozen=True)
class Probes:
    """Machine limits measured once per run."""

    gemm_fp32: float  # FLOP/s
    gemm_bf16: float
    copy: float  # bytes/s, read + write counted
    read: float  # bytes/s, read only

    def gemm(self, dtype: torch.dtype) -> float:
        """The GEMM peak in ``dtype``."""
        return self.gemm_bf16 if dtype == torch.bfloat16 else self.gemm_fp32


def measure_probes(size: int = 1024, device: torch.device | str = "cpu") -> Probes:
    """GEMM (fp32, bf16), copy and read bandwidth on ``device``."""
    return Probes(measure_gemm_flops(device, torch.float32, size=size),
                  measure_gemm_flops(device, torch.bfloat16, size=size),
                  measure_copy_bandwidth(device), measure_read_bandwidth(device))


@dataclasses.dataclass(frozen=True)
class Costs:
    """What one token costs the model: matmul FLOPs, weight and K/V bytes."""

    matmul_params: int  # weights multiplied per token (output head included, embedding not)
    weight_bytes: int  # bytes a step reads (embedding rows aside)
    kv_bytes_per_token: int  # K and V of one token across layers
    attn_flops_per_key: int  # QK and AV FLOPs per (query, key) pair across layers

    @classmethod
    def of(cls, model: torch.nn.Module, cfg: ModelConfig, dtype: torch.dtype) -> Costs:
        """Costs of ``model`` in ``dtype``."""
        matmul = num_params(model, non_embedding=True) + cfg.dim * cfg.vocab_size
        kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
        return cls(matmul, matmul * dtype.itemsize, kv, 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim)

    def step_seconds(self, contexts: list[int], probes: Probes, dtype: torch.dtype) -> float:
        """Roofline floor of one decode step over sequences of these context lengths."""
        flops = 2 * self.matmul_params * len(contexts) + self.attn_flops_per_key * sum(contexts)
        nbytes = self.weight_bytes + self.kv_bytes_per_token * sum(contexts)
        return flops / probes.gemm(dtype) + nbytes / probes.read

    def trace_seconds(self, trace: list[TraceRequest], max_num_seqs: int, probes: Probes,
                      dtype: torch.dtype) -> float:
        """Roofline floor of a whole offline trace: every prompt's FLOPs, then ideal continuous
        batching (no padding, a finished sequence replaced at once) at the GEMM and read peaks."""
        prefill = sum(2 * self.matmul_params * len(r.prompt)
                      + self.attn_flops_per_key * len(r.prompt) ** 2 // 2 for r in trace)
        total = prefill / probes.gemm(dtype) + self.weight_bytes * len(trace) / probes.read
        queue = sorted(trace, key=lambda r: -r.output_len)
        live: list[list[int]] = []  # [context, tokens left]
        while queue or live:
            while queue and len(live) < max_num_seqs:
                r = queue.pop()
                live.append([len(r.prompt), r.output_len])
            total += self.step_seconds([c for c, _ in live], probes, dtype)
            for s in live:
                s[0] += 1
                s[1] -= 1
            live = [s for s in live if s[1] > 0]
        return total


def offline_runs(model, tokenizer, hf_model, trace: list[TraceRequest], reps: int,
                 batch_sizes: tuple[int, ...], max_num_seqs: int, progress: Progress,
                 compile: bool = False) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm each side up (untimed), then ``reps`` interleaved timed runs of every configuration.

    Each engine run gets a fresh engine: a reused one would serve the repeated prompts from
    its prefix cache. HF static batching tries every batch size in the first repetition and
    repeats only the best one after that (the others are recorded once). Returns the runs
    (output tokens/s) and, with ``compile``, the compiled engine's start-up seconds per build.
    """
    warm = trace[:2]
    t0 = time.perf_counter()
    engine_offline(LLMEngine(model, tokenizer, max_num_seqs=max_num_seqs), warm)
    hf_sequential(hf_model, warm)
    hf_static_batch(hf_model, warm)
    progress.add("offline warm-up", time.perf_counter() - t0)
    runs: dict[str, list[float]] = {"engine": [], "hf_sequential": []}
    if compile:
        runs["engine_compiled"] = []
    runs.update({f"hf_static_{b}": [] for b in batch_sizes})
    compile_startup: list[float] = []

    def timed(name: str, fn, *args: Any) -> None:
        t = time.perf_counter()
        tok_s = fn(*args)
        dt = time.perf_counter() - t
        runs[name].append(tok_s)
        progress.add(f"offline {'hf_static' if name.startswith('hf_static') else name}", dt)
        progress.log(f"  {name}: {tok_s:,.1f} tok/s in {dt:.1f} s")

    for rep in range(reps):
        t_rep = time.perf_counter()
        progress.log(f"offline repetition {rep + 1}/{reps}")
        timed("engine", engine_offline, LLMEngine(model, tokenizer, max_num_seqs=max_num_seqs), trace)
        if compile:
            t = time.perf_counter()
            engine = LLMEngine(model, tokenizer, max_num_seqs=max_num_seqs, compile=True)
            compile_startup.append(time.perf_counter() - t)
            progress.add("compile start-up", compile_startup[-1])
            progress.log(f"  compiled engine built in {compile_startup[-1]:.1f} s")
            timed("engine_compiled", engine_offline, engine, trace)
        timed("hf_sequential", hf_sequential, hf_model, trace)
        sizes = batch_sizes if rep == 0 else (
            max(batch_sizes, key=lambda b: statistics.median(runs[f"hf_static_{b}"])),)
        for b in sizes:
            timed(f"hf_static_{b}", hf_static_batch, hf_model, trace, b)
        if rep == 0 and reps > 1:
            # Later repetitions repeat everything but the HF batch sizes that lost.
            losers = sum(1 / statistics.median(runs[f"hf_static_{b}"]) for b in batch_sizes)
            best = 1 / max(statistics.median(runs[f"hf_static_{b}"]) for b in batch_sizes)
            total_out = sum(r.output_len for r in trace)
            per_rep = time.perf_counter() - t_rep - (losers - best) * total_out
            progress.log(f"offline: repetition 1 took {time.perf_counter() - t_rep:.0f} s; "
                         f"expect ~{per_rep * (reps - 1):.0f} s more for the other {reps - 1}")
    return runs, {"compile_startup_s": compile_startup} if compile else {}


def bench_model(cfg: ModelConfig, seed: int) -> tuple[torch.nn.Module, Any]:
    """The bench's model (random weights from ``seed``, fp32, on the CPU) and tokenizer."""
    tokenizer = train_tokenizer((d.text for d in builtin_documents("docs")), vocab_size=cfg.vocab_size)
    torch.manual_seed(seed)
    return build_model(cfg).eval(), tokenizer


def run_engine_bench(out: Path | None = None, preset: str = "bench",
                     num_requests: int = OFFLINE_REQUESTS, reps: int = 3,
                     seeds: tuple[int, ...] = (0, 1, 2),
                     quick: bool = False, seed: int = 0, compile: bool = False,
                     max_out: int = OFFLINE_MAX_OUT, device: str | None = None) -> dict[str, Any]:
    """Run every measurement; write JSON (+ a JCT-vs-load PNG next to it) and print a table.

    ``quick``: the tiny preset and a handful of requests, for a smoke test of the whole path.
    ``compile``: also the engine with ``engine.compile`` (offline rows, decode steps, start-up).
    ``device``: where both sides run (default: CUDA where available, else the CPU); on CUDA the
    probes are the GPU's and the decode steps add batch 256.
    """
    from transformers import AutoModelForCausalLM

    progress = Progress()
    t_start = progress.t0
    if quick:
        preset, num_requests, seeds = "tiny", 6, (0, 1, 2)
    scenarios = tuple(s.quick() for s in SCENARIOS) if quick else SCENARIOS
    batch_sizes = tuple(b for b in HF_STATIC_BATCH_SIZES if b < num_requests) + (num_requests,)
    tuned = tune_cpu_allocator()  # deliberately, for both sides
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    cfg = get_preset(preset)
    dev = torch.device(device) if device else default_device()
    dtype = resolve_dtype("auto", dev)
    progress.log(f"model {preset} in {dtype} on {dev}: random weights, seed {seed}")
    model, tokenizer = bench_model(cfg, seed)
    model_dir = save_model_dir(work / "model", model, tokenizer)
    export_hf(model_dir, work / "hf")
    model.to(dev, dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=dtype).eval().to(dev)
    progress.add("set-up", progress.elapsed)

    t = time.perf_counter()
    probes = measure_probes(size=256 if quick else 1024, device=dev)
    progress.add("probes", time.perf_counter() - t)
    progress.log(f"probes: GEMM fp32 {probes.gemm_fp32 / 1e9:.1f} / bf16 {probes.gemm_bf16 / 1e9:.1f} "
                 f"GFLOP/s, copy {probes.copy / 1e9:.1f} GB/s, read {probes.read / 1e9:.1f} GB/s")
    costs = Costs.of(model, cfg, dtype)

    trace = make_trace(num_requests, cfg.vocab_size, seed, max_prompt=min(512, cfg.max_seq_len // 2),
                       max_out=min(max_out, cfg.max_seq_len // 2))
    max_num_seqs = 64
    progress.log(f"offline trace: {len(trace)} requests, {sum(len(r.prompt) for r in trace)} prompt "
                 f"and {sum(r.output_len for r in trace)} output tokens; {reps} repetitions")
    runs, compile_info = offline_runs(model, tokenizer, hf_model, trace, reps, batch_sizes,
                                      max_num_seqs, progress, compile)
    best_static = max(batch_sizes, key=lambda b: statistics.median(runs[f"hf_static_{b}"]))
    engine_tok_s = statistics.median(runs["engine"])
    hf_seq = statistics.median(runs["hf_sequential"])
    hf_static = statistics.median(runs[f"hf_static_{best_static}"])
    total_out = sum(r.output_len for r in trace)
    roofline_tok_s = total_out / costs.trace_seconds(trace, max_num_seqs, probes, dtype)

    context = 48 if quick else min(STEP_CONTEXT, cfg.max_seq_len - 40)
    step_batches = (256, 64, 1) if dev.type == "cuda" else (64, 1)  # 256: the GPU's figure
    progress.log(f"decode steps at {context} tokens of context: batch {', '.join(map(str, step_batches))}")
    t = time.perf_counter()
    steps: dict[int, float] = {}
    compiled_steps: dict[int, float] = {}
    for batch in step_batches:
        engine = LLMEngine(model, tokenizer, max_num_seqs=max(batch, 64), max_num_batched_tokens=4096)
        steps[batch] = decode_step_seconds(engine, batch, context, 8 if batch > 1 else 24, cfg.vocab_size)
        if compile:
            engine = LLMEngine(model, tokenizer, max_num_seqs=max(batch, 64), max_num_batched_tokens=4096,
                               compile=True)
            compiled_steps[batch] = decode_step_seconds(engine, batch, context, 8 if batch > 1 else 24,
                                                        cfg.vocab_size)
    progress.add("decode steps", time.perf_counter() - t)
    progress.log("decode step ms: " + ", ".join(
        f"b{b} {steps[b] * 1e3:.1f}" + (f" (compiled {compiled_steps[b] * 1e3:.1f})" if compile else "")
        for b in steps))
    floor = {b: costs.step_seconds([context + 8] * b, probes, dtype) for b in steps}
    mbu_b1 = (costs.weight_bytes + costs.kv_bytes_per_token * (context + 8)) / steps[1] / probes.copy

    # Online: every scenario's sweep; the headline JCT keys come from the first (kv-bound) at
    # its knee; the others (FastServe's overload setting, slot-bound) are reported beside it.
    online = run_scenarios(model, tokenizer, cfg, scenarios, seeds, seed, progress)
    t = time.perf_counter()
    sim = schedule_sim(model, tokenizer, cfg, online, steps, seed)
    progress.add("schedule simulator", time.perf_counter() - t)
    headline = online[scenarios[0].name]
    at = headline["by_load"][str(headline["saturation_load"])]
    report: dict[str, Any] = {
        "engine_tok_s": engine_tok_s, "hf_sequential_tok_s": hf_seq, "hf_static_batch_tok_s": hf_static,
        "roofline_tok_s": roofline_tok_s,
        "step_roofline_ratio_b64": floor[64] / steps[64], "step_roofline_ratio_b1": floor[1] / steps[1],
        "mbu_b1": mbu_b1,
        "jct_mean_fcfs": at["jct_mean_fcfs"], "jct_mean_mlfq": at["jct_mean_mlfq"],
        "jct_p99_fcfs": at["jct_p99_fcfs"], "jct_p99_mlfq": at["jct_p99_mlfq"],
        "jct_gain_captured": at["jct_gain_captured"],
        "dtype": str(dtype).removeprefix("torch."),
        "details": {
            "offline_tok_s": {k: _summary(v) for k, v in runs.items()},
            "hf_static_best_batch_size": best_static,
            "ratio_vs_hf_sequential": engine_tok_s / hf_seq,
            "ratio_vs_hf_static_batch": engine_tok_s / hf_static,
            "fraction_of_roofline": engine_tok_s / roofline_tok_s,
            "decode_step_ms": {str(b): t * 1e3 for b, t in steps.items()},
            "decode_tok_s_by_batch": {str(b): b / t for b, t in steps.items()},
            "decode_step_roofline_ms": {str(b): t * 1e3 for b, t in floor.items()},
            "step_context_tokens": context,
            "compile": None if not compile else {
                "offline_tok_s": _summary(runs["engine_compiled"]),
                "ratio_vs_eager_engine": statistics.median(runs["engine_compiled"]) / engine_tok_s,
                "decode_step_ms": {str(b): t * 1e3 for b, t in compiled_steps.items()},
                "startup_s": compile_info["compile_startup_s"],
            },
            "parts_s": dict(progress.parts),
            "probes": {"gemm_fp32_gflops": probes.gemm_fp32 / 1e9,
                       "gemm_bf16_gflops": probes.gemm_bf16 / 1e9,
                       "copy_gbps": probes.copy / 1e9, "read_gbps": probes.read / 1e9},
            "online_headline_scenario": scenarios[0].name,
            "online": online,
            "schedule_sim": sim,
            "targets": TARGETS,
        },
        "config": {"preset": preset, "params": num_params(model), "num_requests": num_requests, "reps": reps,
                   "max_num_seqs": max_num_seqs, "seeds": list(seeds), "seed": seed, "max_out": max_out,
                   "compile": compile,
                   "mean_output_len": total_out / len(trace), "cpu_allocator_tuned_both_sides": tuned,
                   "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
                   "processor": platform.processor(), "torch": torch.__version__, "device": str(dev),
                   "quick": quick, "wall_s": time.perf_counter() - t_start},
    }
    _print(report)
    if out is not None:
        plot_jct_vs_load({name: sc["runs"] for name, sc in online.items()},
                         out.with_name(out.stem + "_jct_vs_load.png"))
        write_json(report, out, "engine")
    return report


def schedule_sim(model: torch.nn.Module, tokenizer, cfg: ModelConfig, online: dict[str, Any],
                 steps: dict[int, float], seed: int, seeds: int = SIM_SEEDS) -> dict[str, Any]:
    """The memory-bound scenarios at their knee replayed in the scheduling simulator
    (schedule_sim.py) on ``seeds`` seeds, with a cost model fitted to this run's decode steps
    and mlfq's prefill profile: every policy, and the srpt-oracle reference."""
    result: dict[str, Any] = {"seeds": seeds}
    fitted = None
    for sc in SCENARIOS:
        if sc.name not in online or sc.kv_full_sequences is None:
            continue
        base, kw = scenario_trace(cfg, sc, seed)
        probe = LLMEngine(model, tokenizer, policy="mlfq", **kw)  # its prefill profile and host tier
        fitted = fitted or StepCost.calibrate(steps, probe.prefill_time)
        shape = SimShape(kw["num_blocks"], probe.block_manager.num_host_blocks, kw["max_num_seqs"],
                         kw["max_num_batched_tokens"])
        measured = online[sc.name]["capacity_req_s"]
        scale = simulated_capacity(base, shape, fitted) / measured  # same queue as the real run's
        cost = fitted.scaled(scale)
        load = online[sc.name]["saturation_load"]
        result[sc.name] = {"load": load, "rate_req_s": load * measured,
                           "num_host_blocks": shape.num_host_blocks,
                           "cost_model": dataclasses.asdict(cost), "capacity_scale": scale,
                           "policies": simulate_sweep(base, load * measured, range(seeds), shape, cost)}
    result["fitted_cost_model"] = dataclasses.asdict(fitted) if fitted else None
    return result


def resimulate(path: Path) -> dict[str, Any]:
    """Recompute ``details.schedule_sim`` of an existing engine-bench JSON from its measured
    decode steps and capacities (the model rebuilt from its config for the prefill profile),
    and rewrite the file; the measured figures are left as they were."""
    report = json.loads(Path(path).read_text())
    c = report["config"]
    cfg = get_preset(c["preset"])
    model, tokenizer = bench_model(cfg, c["seed"])
    dev = torch.device(c["device"])
    model.to(dev, resolve_dtype("auto", dev))
    d = report["details"]
    steps = {int(b): ms / 1e3 for b, ms in d["decode_step_ms"].items()}
    d["schedule_sim"] = schedule_sim(model, tokenizer, cfg, d["online"], steps, c["seed"])
    d["schedule_sim"]["recomputed_after_the_run"] = True
    _print_sim(d["schedule_sim"])
    write_json(report, Path(path), "engine")
    return report


def _share(x: float | None) -> str:
    return "n/a (no wait to remove)" if x is None else f"{x:.2f}"


def _print(r: dict[str, Any]) -> None:
    d = r["details"]
    off = d["offline_tok_s"]

    def spread(key: str) -> str:
        return f"{off[key]['min']:,.0f}-{off[key]['max']:,.0f}"

    headline = d["online"][d["online_headline_scenario"]]
    knee = headline["by_load"][str(headline["saturation_load"])]
    rows = [
        ("engine (continuous batching, 64)", f"{r['engine_tok_s']:,.0f}", spread("engine"),
         f"{d['fraction_of_roofline']:.0%} of roofline {r['roofline_tok_s']:,.0f}"),
        ("HF generate, sequential", f"{r['hf_sequential_tok_s']:,.0f}", spread("hf_sequential"),
         f"engine {d['ratio_vs_hf_sequential']:.1f}x (target >= {TARGETS['vs_hf_sequential']:g}x)"),
        (f"HF generate, static batch {d['hf_static_best_batch_size']}", f"{r['hf_static_batch_tok_s']:,.0f}",
         spread(f"hf_static_{d['hf_static_best_batch_size']}"),
         f"engine {d['ratio_vs_hf_static_batch']:.1f}x (target >= {TARGETS['vs_hf_static_batch']:g}x)"),
        ("decode step b64 / b1 (ms)", f"{d['decode_step_ms']['64']:.1f} / {d['decode_step_ms']['1']:.2f}", "",
         f"roofline {d['decode_step_roofline_ms']['64']:.1f} / {d['decode_step_roofline_ms']['1']:.2f}"),
        ("step roofline ratio b64 / b1",
         f"{r['step_roofline_ratio_b64']:.2f} / {r['step_roofline_ratio_b1']:.2f}",
         "", f"target >= {TARGETS['step_roofline_ratio']:.2f}"),
        ("decode MBU, batch 1", f"{r['mbu_b1']:.1%}", "", f"target >= {TARGETS['mbu_b1']:.0%}"),
        (f"JCT mean fcfs / mlfq, {d['online_headline_scenario']} @ load "
         f"{d['online'][d['online_headline_scenario']]['saturation_load']:g}",
         f"{r['jct_mean_fcfs']:.2f} / {r['jct_mean_mlfq']:.2f}", "s",
         f"{r['jct_mean_fcfs'] / r['jct_mean_mlfq']:.2f}x (target >= {TARGETS['jct_mean_ratio']:g}x; "
         f"no-wait bound {knee['jct_mean_ratio_bound']:.2f}x, gain captured "
         f"{_share(knee['jct_gain_captured'])}, target >= {TARGETS['jct_gain_captured']:g})"),
        ("JCT mean, short requests, fcfs / mlfq",
         f"{knee['jct_mean_short_fcfs']:.2f} / {knee['jct_mean_short_mlfq']:.2f}", "s",
         f"{knee['jct_mean_short_fcfs'] / knee['jct_mean_short_mlfq']:.2f}x (outputs <= the median)"),
        ("JCT p99 fcfs / mlfq", f"{r['jct_p99_fcfs']:.2f} / {r['jct_p99_mlfq']:.2f}", "s",
         f"mlfq/fcfs {r['jct_p99_mlfq'] / r['jct_p99_fcfs']:.2f} "
         f"(target <= {TARGETS['jct_p99_ratio_max']:g})"),
    ]
    c = d.get("compile")
    if c:
        rows.insert(1, ("engine, engine.compile", f"{c['offline_tok_s']['median']:,.0f}",
                        f"{c['offline_tok_s']['min']:,.0f}-{c['offline_tok_s']['max']:,.0f}",
                        f"{c['ratio_vs_eager_engine']:.2f}x eager; start-up "
                        f"{statistics.median(c['startup_s']):.0f} s"))
        rows.insert(5, ("compiled decode step b64 / b1 (ms)",
                        f"{c['decode_step_ms']['64']:.1f} / {c['decode_step_ms']['1']:.2f}", "", ""))
    print_table(("measurement", "median", "spread", "comparison"), rows)
    for name, sc in d["online"].items():
        print(f"{name}: {sc['about']}; capacity {sc['capacity_req_s']:.2f} req/s, "
              f"knee at load {sc['saturation_load']:g}:")
        for load, v in sc["by_load"].items():
            print(f"  load {load}: JCT mean fcfs {v['jct_mean_fcfs']:.2f}s mlfq {v['jct_mean_mlfq']:.2f}s "
                  f"({v['jct_mean_fcfs'] / v['jct_mean_mlfq']:.2f}x; "
                  f"bound {v['jct_mean_ratio_bound']:.2f}x, gain captured "
                  f"{_share(v['jct_gain_captured'])}), "
                  f"short requests {v['jct_mean_short_fcfs']:.2f}s / {v['jct_mean_short_mlfq']:.2f}s, "
                  f"p99 fcfs {v['jct_p99_fcfs']:.2f}s mlfq {v['jct_p99_mlfq']:.2f}s, "
                  f"TTFT mean fcfs {v['ttft_mean_fcfs']:.2f}s mlfq {v['ttft_mean_mlfq']:.2f}s")
            if "jct_mean_fcfs-swap" in v:
                print(f"    fcfs-swap (fcfs with mlfq's swapping): JCT mean {v['jct_mean_fcfs-swap']:.2f}s, "
                      f"p99 {v['jct_p99_fcfs-swap']:.2f}s, TTFT mean {v['ttft_mean_fcfs-swap']:.2f}s; "
                      f"mlfq {v['jct_mean_fcfs-swap'] / v['jct_mean_mlfq']:.2f}x of it, gain captured "
                      f"{_share(v['jct_gain_captured_vs_fcfs_swap'])}")
    _print_sim(d["schedule_sim"])
    p = d["probes"]
    print(f"{r['dtype']}; GEMM fp32 {p['gemm_fp32_gflops']:.1f} / bf16 {p['gemm_bf16_gflops']:.1f} GFLOP/s, "
          f"copy {p['copy_gbps']:.1f} GB/s, read {p['read_gbps']:.1f} GB/s")
    print("wall time per part: " + ", ".join(f"{k} {v:.0f} s" for k, v in d["parts_s"].items())
          + f"; total {r['config']['wall_s']:.0f} s")


def _print_sim(sim: dict[str, Any]) -> None:
    for name, sc in sim.items():
        if not isinstance(sc, dict) or "policies" not in sc:
            continue
        print(f"simulated {name} @ load {sc['load']:g} (median of {sim['seeds']} seeds; cost model fitted "
              f"to this run's steps, x{sc['capacity_scale']:.2f} to its measured capacity; a model, not a "
              "measurement):")
        for policy, v in sc["policies"].items():
            print(f"  {policy}: JCT mean {v['jct_mean']:.2f}s p99 {v['jct_p99']:.2f}s "
                  f"TTFT {v['ttft_mean']:.2f}s, "
                  f"gain captured {_share(v['jct_gain_captured'])} "
                  f"[{_share(v['jct_gain_captured_min'])}, {_share(v['jct_gain_captured_max'])}], "
                  f"p99 vs fcfs {v['jct_p99_vs_fcfs']:.2f}")
