"""Our engine against the engines users would pick instead: `fastserve-ray bench peers`.

One checkpoint for everyone: the `bench` preset (random weights, seed 0), read by vLLM from its
`export-hf` copy and by llama.cpp from GGUF files converted from that copy (the machine's default
dtype, and Q8_0 beside our int8 artifact from the `int8` recipe). The same requests: the engine
bench's offline trace (seeded prompts, Pareto-tailed output lengths, greedy, EOS ignored, token
ids in and out). The same dtype (bfloat16 where the CPU has AVX-512 BF16, else float32; the KV
cache too), all of the machine's cores for each side, and the same allocator thresholds.

Measured, each after one untimed warm-up and in interleaved repetitions (ours, theirs, ours, ...):

- offline trace tokens/s: our `LLMEngine.generate`, vLLM's `LLM.generate`, llama.cpp with up to
  as many parallel sequences as our engine batches (its `examples/parallel` / server-slot mode)
  and llama.cpp one request at a time (batch 1);
- batch-1 decode: the median step time of DECODE_STEPS steps at STEP_CONTEXT tokens of context
  (both sides time every step and keep the median), float and int8 vs Q8_0, B1_REPS repetitions,
  and MBU (bytes each engine's step reads / step time / the copy bandwidth probed in this run).

The peers run in their own virtual environment (`scripts/setup_peers.sh`) as child processes
that stay loaded (`bench/peer_clients.py`). A peer that cannot install or run is reported with
its exact error and the rest is compared.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve_ray.bench.engine import (
    STEP_CONTEXT,
    Costs,
    decode_step_seconds,
    engine_offline,
    measure_probes,
)
from fastserve_ray.bench.peer_clients import LlamaCpp, PeerError, PeerProcess, VLLMOffline, convert_to_gguf
from fastserve_ray.bench.report import Progress, print_table, write_json
from fastserve_ray.bench.trace import make_trace
from fastserve_ray.capability import capability
from fastserve_ray.compress.recipe import load_recipe
from fastserve_ray.compress.serial import run_serial
from fastserve_ray.data import builtin_documents
from fastserve_ray.device import resolve_dtype
from fastserve_ray.engine import LLMEngine
from fastserve_ray.models import build_model, save_model_dir
from fastserve_ray.models.hf import export_hf
from fastserve_ray.models.presets import parse_preset_spec
from fastserve_ray.perf import tune_cpu_allocator
from fastserve_ray.quantized.linear import QuantizedLinear
from fastserve_ray.tokenizer import train_tokenizer

# Issue 18's targets: ratios of ours to the peer, same machine, same run.
TARGETS = {"offline_vs_vllm": 1.2, "b1_vs_llamacpp": 1.0, "b1_int8_vs_llamacpp_q8_0": 1.0}
OFFLINE_REQUESTS = 24
OFFLINE_MAX_OUT = 256
MAX_NUM_SEQS = 64
DECODE_STEPS = 64  # timed single-token steps per batch-1 measurement (the median step is kept)
B1_REPS = 5  # batch-1 repetitions: a measurement is a third of a second, so more of them


def _summary(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def _int8_weight_bytes(engine: LLMEngine, head_bytes: int) -> int:
    """Bytes a decode step of our int8 model reads: quantized linears' storage and scales, plus
    the output head the recipe leaves in float (``ignore: [lm_head]``)."""
    total = head_bytes
    for m in engine.runner.model.modules():
        if isinstance(m, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False) if b is not None)
    return total


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.processor() or platform.machine())


class _Peers:
    """The peer processes of one bench run; any that fails is recorded with its error and dropped."""

    def __init__(self, report: dict[str, Any], progress: Progress) -> None:
        self.report, self.progress, self.live = report, progress, {}

    def start(self, key: str, make: Callable[[], PeerProcess]) -> None:
        t = time.perf_counter()
        try:
            peer = make()
        except PeerError as e:
            self.report[key] = {"error": str(e)}
            self.progress.log(f"{key} cannot run here: {e}")
            return
        self.live[key] = peer
        self.report[key] = {"version": peer.version, "load_s": peer.load_s}
        self.progress.log(f"{key} {peer.version} loaded in {time.perf_counter() - t:.0f} s")

    def call(self, key: str, fn: Callable[[Any], float]) -> float | None:
        """``fn(peer)`` if that peer is running; on its failure record the error and stop it."""
        peer = self.live.get(key)
        if peer is None:
            return None
        try:
            return fn(peer)
        except PeerError as e:
            self.report[key]["error"] = str(e)
            self.progress.log(f"{key} failed: {e}")
            peer.close()
            del self.live[key]
            return None

    def close(self) -> None:
        for peer in self.live.values():
            peer.close()


def _check_conversion(peers: _Peers, reference: torch.Tensor, prompt: list[int]) -> None:
    """llama.cpp's logits on the converted file against our model's: a wrong conversion (tensor
    names, the q/k permutation, the vocabulary) would make every llama.cpp figure meaningless."""
    got = peers.call("llamacpp", lambda p: p.logits(prompt))
    if got is None:
        return
    diff = (torch.tensor(got) - reference).abs().max().item()
    scale = reference.abs().max().item()
    same_top1 = int(torch.tensor(got).argmax()) == int(reference.argmax())
    peers.report["llamacpp"]["conversion_check"] = {"max_abs_logit_diff": diff, "logit_scale": scale,
                                                    "same_argmax": same_top1}
    peers.progress.log(f"llama.cpp conversion check: max |logit diff| {diff:.4f} of {scale:.2f}, "
                       f"same argmax {same_top1}")
    if diff > 0.05 * scale:
        peers.report["llamacpp"]["error"] = f"the GGUF file disagrees with the model: max |logit diff| {diff}"
        peers.live.pop("llamacpp").close()


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, part, title in ((a, report["offline"], "offline trace, output tok/s"),
                            (b, report["decode_b1"], f"batch-1 decode at {STEP_CONTEXT} context, tok/s")):
        names = [k for k in part if isinstance(part[k], dict) and "median" in part[k]]
        med = [part[k]["median"] for k in names]
        err = [[m - part[k]["min"] for k, m in zip(names, med, strict=True)],
               [part[k]["max"] - m for k, m in zip(names, med, strict=True)]]
        ax.bar(range(len(names)), med, yerr=err, capsize=4,
               color=["tab:blue" if n.startswith("fastserve") else "tab:gray" for n in names])
        ax.set_xticks(range(len(names)), [n.replace("_tok_s", "").replace("_", " ") for n in names],
                      rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    c = report["config"]
    fig.suptitle(f"{c['preset']} preset, {c['dtype']}, {c['threads']} threads, {c['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_peers_bench(out: Path | None = None, preset: str = "bench", reps: int = 3,
                    num_requests: int = OFFLINE_REQUESTS, quick: bool = False) -> dict[str, Any]:
    """Offline tokens/s and batch-1 decode, ours vs vLLM CPU and llama.cpp; JSON, table and PNG."""
    progress = Progress("peers")
    if quick:
        preset, num_requests, reps = "small", 6, 1
    tune_cpu_allocator()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    cap = capability()
    cfg = parse_preset_spec(preset)  # "bench,qkv_bias=true": the Qwen2 shape
    dtype = resolve_dtype("auto", torch.device("cpu"))
    dtype_name = str(dtype).removeprefix("torch.")
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    tokenizer = train_tokenizer((d.text for d in builtin_documents("docs")), vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model_dir = save_model_dir(work / "model", model, tokenizer)
    hf_dir = export_hf(model_dir, work / "hf")
    int8_dir = work / "int8"
    run_serial(model_dir, int8_dir, load_recipe("int8"), quiet=True)
    check_prompt = list(range(3, 3 + min(64, cfg.max_seq_len // 4)))
    with torch.no_grad():  # float32 logits of our model: the reference the GGUF file is checked against
        reference = model(torch.tensor([check_prompt]))[0, -1].float()
    model.to(dtype=dtype)
    trace = make_trace(num_requests, cfg.vocab_size, 0, max_prompt=min(512, cfg.max_seq_len // 2),
                       max_out=min(OFFLINE_MAX_OUT, cfg.max_seq_len // 2))
    context = min(STEP_CONTEXT, cfg.max_seq_len - DECODE_STEPS - 16)
    probes = measure_probes()
    costs = Costs.of(model, cfg, dtype)
    cpu_name = _cpu_name()
    progress.log(f"model {preset} in {dtype_name}, {threads} threads each; trace: {len(trace)} requests, "
                 f"{sum(len(r.prompt) for r in trace)} prompt and {sum(r.output_len for r in trace)} "
                 f"output tokens; {reps} interleaved repetitions")
    report: dict[str, Any] = {
        "config": {"preset": preset, "dtype": dtype_name, "threads": threads, "num_requests": len(trace),
                   "prompt_tokens": sum(len(r.prompt) for r in trace),
                   "output_tokens": sum(r.output_len for r in trace), "reps": reps,
                   "max_num_seqs": MAX_NUM_SEQS, "decode_context": context, "decode_steps": DECODE_STEPS,
                   "b1_reps": max(reps, B1_REPS),
                   "machine": platform.machine(), "cpu": cpu_name, "cpu_isa": cap.isa,
                   "torch": torch.__version__, "quick": quick,
                   "probes": {"copy_gb_s": probes.copy / 1e9, "read_gb_s": probes.read / 1e9}},
        "peers": {}, "targets": TARGETS,
    }
    peers = _Peers(report["peers"], progress)
    gguf_bytes: dict[str, int] = {}
    for weights in (dtype_name, "q8_0"):
        try:
            gguf_bytes[weights] = convert_to_gguf(hf_dir, work / f"model-{weights}.gguf", weights)
        except PeerError as e:
            report["peers"][f"gguf_{weights}"] = {"error": str(e)}
            progress.log(f"no GGUF {weights}: {e}")
    peers.start("vllm", lambda: VLLMOffline(hf_dir, dtype_name, cfg.max_seq_len, threads, MAX_NUM_SEQS))
    if dtype_name in gguf_bytes:
        peers.start("llamacpp", lambda: LlamaCpp(work / f"model-{dtype_name}.gguf", dtype_name, threads,
                                                 MAX_NUM_SEQS, cfg.max_seq_len))
    if "q8_0" in gguf_bytes:
        peers.start("llamacpp_q8_0", lambda: LlamaCpp(work / "model-q8_0.gguf", dtype_name, threads, 1,
                                                      cfg.max_seq_len))
    if "vllm" in peers.live:
        report["peers"]["vllm"]["threads_bind"] = peers.live["vllm"].threads_bind
    if "llamacpp" in peers.live:
        report["peers"]["llamacpp"]["system_info"] = peers.live["llamacpp"].hello.get("system_info")
        _check_conversion(peers, reference, check_prompt)

    offline: dict[str, list[float]] = {"fastserve_ray_tok_s": [], "vllm_tok_s": [],
                                       "llamacpp_parallel_tok_s": [], "llamacpp_b1_tok_s": []}
    rng = np.random.default_rng(0)  # the prompt decode_step_seconds gives our engine's sequence
    b1_prompt = rng.integers(3, cfg.vocab_size, context).tolist()
    decode: dict[str, list[float]] = {"fastserve_ray_tok_s": [], "llamacpp_tok_s": [],
                                      "fastserve_ray_int8_tok_s": [], "llamacpp_q8_0_tok_s": []}
    int8_engine = LLMEngine.from_model_dir(int8_dir, device="cpu", dtype=dtype, max_num_seqs=4)
    try:
        # Warm-ups, untimed: allocator, kernel plans, the peers' first-call costs.
        engine_offline(LLMEngine(model, tokenizer, max_num_seqs=MAX_NUM_SEQS), trace[:2])
        decode_step_seconds(LLMEngine(model, tokenizer, max_num_seqs=4), 1, context, 4, cfg.vocab_size)
        decode_step_seconds(int8_engine, 1, context, 4, cfg.vocab_size)
        peers.call("vllm", lambda p: p.run(trace[:2]))
        peers.call("llamacpp", lambda p: p.run(trace[:2]))
        peers.call("llamacpp", lambda p: p.decode_step_seconds(b1_prompt, 4))
        peers.call("llamacpp_q8_0", lambda p: p.decode_step_seconds(b1_prompt, 4))
        for rep in range(reps):
            # A fresh engine per run: a reused one would serve the repeated prompts from its cache
            # (vLLM runs with its prefix cache off, llama.cpp's KV is cleared per run, likewise).
            runs = {
                "fastserve_ray_tok_s": lambda: engine_offline(
                    LLMEngine(model, tokenizer, max_num_seqs=MAX_NUM_SEQS), trace),
                "vllm_tok_s": lambda: peers.call("vllm", lambda p: p.run(trace)),
                "llamacpp_parallel_tok_s": lambda: peers.call("llamacpp", lambda p: p.run(trace)),
                "llamacpp_b1_tok_s": lambda: peers.call("llamacpp", lambda p: p.run(trace, parallel=1)),
            }
            for key, run in runs.items():
                got = run()
                if got is not None:
                    offline[key].append(got)
                    name = key.removesuffix("_tok_s")
                    progress.log(f"rep {rep + 1}/{reps} offline {name}: {got:,.1f} tok/s")
        steps = {
            "fastserve_ray_tok_s": lambda: decode_step_seconds(
                LLMEngine(model, tokenizer, max_num_seqs=4), 1, context, DECODE_STEPS, cfg.vocab_size),
            "llamacpp_tok_s": lambda: peers.call(
                "llamacpp", lambda p: p.decode_step_seconds(b1_prompt, DECODE_STEPS)),
            "fastserve_ray_int8_tok_s": lambda: decode_step_seconds(
                int8_engine, 1, context, DECODE_STEPS, cfg.vocab_size),
            "llamacpp_q8_0_tok_s": lambda: peers.call(
                "llamacpp_q8_0", lambda p: p.decode_step_seconds(b1_prompt, DECODE_STEPS)),
        }
        keys = list(steps)
        b1_reps = max(reps, B1_REPS)
        for rep in range(b1_reps):  # each repetition in another order: no side always runs first
            for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
                step_s = steps[key]()
                if step_s is not None:
                    decode[key].append(1 / step_s)
                    progress.log(f"rep {rep + 1}/{b1_reps} batch-1 {key.removesuffix('_tok_s')}: "
                                 f"{step_s * 1e3:.2f} ms/step")
    finally:
        peers.close()

    head_bytes = cfg.dim * cfg.vocab_size * dtype.itemsize
    kv_bytes = costs.kv_bytes_per_token * (context + DECODE_STEPS // 2)
    step_bytes = {"fastserve_ray_tok_s": costs.weight_bytes, "llamacpp_tok_s": gguf_bytes.get(dtype_name),
                  "fastserve_ray_int8_tok_s": _int8_weight_bytes(int8_engine, head_bytes),
                  "llamacpp_q8_0_tok_s": gguf_bytes.get("q8_0")}
    report["offline"] = {k: _summary(v) for k, v in offline.items() if v}
    report["decode_b1"] = {k: {**_summary(v), "weight_bytes": step_bytes[k],
                               "mbu": (step_bytes[k] + kv_bytes) * statistics.median(v) / probes.copy}
                           for k, v in decode.items() if v}

    def ratio(part: str, ours: str, theirs: str) -> float | None:
        got = report[part]
        return got[ours]["median"] / got[theirs]["median"] if ours in got and theirs in got else None

    report["ratios"] = {
        "offline_vs_vllm": ratio("offline", "fastserve_ray_tok_s", "vllm_tok_s"),
        "offline_vs_llamacpp_parallel": ratio("offline", "fastserve_ray_tok_s", "llamacpp_parallel_tok_s"),
        "b1_vs_llamacpp": ratio("decode_b1", "fastserve_ray_tok_s", "llamacpp_tok_s"),
        "b1_int8_vs_llamacpp_q8_0": ratio("decode_b1", "fastserve_ray_int8_tok_s", "llamacpp_q8_0_tok_s"),
    }
    _print(report)
    if out is not None:
        write_json(report, out, "peers")
        _plot(out.with_suffix(".png"), report)
    return report


def _print(report: dict[str, Any]) -> None:
    def rows(part: dict[str, Any], base: str) -> list[list[str]]:
        ours = part[base]["median"]
        return [[k.removesuffix("_tok_s").replace("_", " "), f"{v['median']:,.1f}",
                 f"{v['min']:,.1f}-{v['max']:,.1f}", f"{v['median'] / ours:.2f}"]
                + ([f"{v['mbu']:.1%}"] if "mbu" in v else []) for k, v in part.items()]

    print_table(["offline trace", "tok/s median", "spread", "vs ours"],
                rows(report["offline"], "fastserve_ray_tok_s"))
    if report["decode_b1"]:
        base = "fastserve_ray_tok_s" if "fastserve_ray_tok_s" in report["decode_b1"] else \
            next(iter(report["decode_b1"]))
        print_table([f"batch-1 decode @{report['config']['decode_context']}", "tok/s median", "spread",
                     "vs ours", "MBU"], rows(report["decode_b1"], base))
    print()
    for name, value in report["ratios"].items():
        if value is not None:
            target = TARGETS.get(name)
            print(f"{name} = {value:.2f}" + (f" (target >= {target})" if target else ""))
