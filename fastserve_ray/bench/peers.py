"""Our engine against the engines users would pick instead: `fastserve-ray bench peers`.

This slice measures the offline batch: our `LLMEngine.generate` against vLLM's CPU backend
(`LLM.generate`), on the same checkpoint (the `bench` preset, random weights, seed 0; vLLM
reads its `export-hf` copy), the same requests (the engine bench's offline trace: seeded
prompts, Pareto-tailed output lengths, greedy, EOS ignored, token ids in and out), the same
dtype (the machine's default: bfloat16 where the CPU has AVX-512 BF16, else float32), and all
of the machine's cores for each side. vLLM runs in its own virtual environment
(`scripts/setup_peers.sh` makes `.venv-peers/`; nothing is installed at run time) as a child
process that stays loaded (`bench/peer_runners/vllm_offline.py`), so the repetitions
interleave: ours, vLLM's, ours, ... after one untimed warm-up each. Both processes get the
same glibc allocator thresholds (perf.tune_cpu_allocator; MALLOC_*_ environment for vLLM).

If a peer cannot install or run, the report says so with its exact error and compares the rest.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fastserve_ray.bench.engine import engine_offline
from fastserve_ray.bench.report import Progress, print_table, write_json
from fastserve_ray.bench.trace import TraceRequest, make_trace
from fastserve_ray.capability import capability
from fastserve_ray.data import builtin_documents
from fastserve_ray.device import resolve_dtype
from fastserve_ray.engine import LLMEngine
from fastserve_ray.models import build_model, get_preset, save_model_dir
from fastserve_ray.models.hf import export_hf
from fastserve_ray.perf import tune_cpu_allocator
from fastserve_ray.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = Path(os.environ.get("FASTSERVE_PEERS_VENV", ROOT / ".venv-peers"))
RUNNERS = Path(__file__).resolve().parent / "peer_runners"
TARGETS = {"offline_vs_vllm": 1.2}  # engine_tok_s / vllm_tok_s (issue 18)
OFFLINE_REQUESTS = 24
OFFLINE_MAX_OUT = 256
MAX_NUM_SEQS = 64
PEER_MARK = "@@peer "  # the runners' answer lines (peer_runners/vllm_offline.py MARK)
ALLOCATOR_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(1 << 30)}


class PeerError(RuntimeError):
    """A peer could not be started or failed; the message is its own error."""


class VLLMOffline:
    """vLLM's LLM loaded once in the peers' interpreter; `run(trace)` -> output tokens/s."""

    def __init__(self, hf_dir: Path, dtype: str, max_model_len: int, threads: int,
                 timeout_s: float = 900) -> None:
        python = PEERS_VENV / "bin" / "python"
        if not python.is_file():
            raise PeerError(f"{python} not found: run scripts/setup_peers.sh first")
        # Every core for the engine, as ours gets; FASTSERVE_PEERS_VLLM_BIND=auto is vLLM's own
        # default (one core kept for its front end), to check which of the two serves it best.
        self.threads_bind = os.environ.get("FASTSERVE_PEERS_VLLM_BIND", f"0-{threads - 1}")
        env = {**os.environ, **ALLOCATOR_ENV, "VLLM_CPU_OMP_THREADS_BIND": self.threads_bind}
        if self.threads_bind != "auto":
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        cfg = {"model": str(hf_dir), "dtype": dtype, "max_model_len": max_model_len,
               "max_num_seqs": MAX_NUM_SEQS, "kv_cache_gib": 4}
        # The child's log lives as long as the child: closed in close(), not in a with-block.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([str(python), str(RUNNERS / "vllm_offline.py"), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=tempfile.gettempdir())
        self.timeout_s = timeout_s
        hello = self._read()
        self.version, self.load_s = hello["version"], hello["load_s"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                raise PeerError(f"vLLM exited ({self.proc.returncode}): {self._error()}")
            if line.startswith(PEER_MARK):  # vLLM's own log lines go to stdout as well
                return json.loads(line[len(PEER_MARK):])

    def _error(self) -> str:
        self.log.flush()
        lines = Path(self.log.name).read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or ["(no output)"])[-1].strip()[-600:]

    def run(self, trace: list[TraceRequest]) -> float:
        req = {"prompts": [r.prompt for r in trace], "output_lens": [r.output_len for r in trace]}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if out["output_lens"] != [r.output_len for r in trace]:
            raise PeerError(f"vLLM produced other output lengths: {out['output_lens']}")
        return out["output_tokens"] / out["elapsed_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _summary(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def _row(name: str, xs: list[float], vs_ours: float) -> list[str]:
    return [name, f"{statistics.median(xs):,.1f}", f"{min(xs):,.1f}-{max(xs):,.1f}", f"{vs_ours:.2f}"]


def run_peers_bench(out: Path | None = None, preset: str = "bench", reps: int = 3,
                    num_requests: int = OFFLINE_REQUESTS, quick: bool = False) -> dict[str, Any]:
    """Offline tokens/s, ours vs vLLM CPU, interleaved repetitions; JSON + table."""
    progress = Progress("peers")
    if quick:
        preset, num_requests, reps = "small", 6, 1
    tune_cpu_allocator()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    cap = capability()
    cfg = get_preset(preset)
    dtype = resolve_dtype("auto", torch.device("cpu"))
    dtype_name = str(dtype).removeprefix("torch.")
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    tokenizer = train_tokenizer((d.text for d in builtin_documents("docs")), vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model_dir = save_model_dir(work / "model", model, tokenizer)
    hf_dir = export_hf(model_dir, work / "hf")
    model.to(dtype=dtype)
    trace = make_trace(num_requests, cfg.vocab_size, 0, max_prompt=min(512, cfg.max_seq_len // 2),
                       max_out=min(OFFLINE_MAX_OUT, cfg.max_seq_len // 2))
    progress.log(f"model {preset} in {dtype_name}, {threads} threads each; trace: {len(trace)} requests, "
                 f"{sum(len(r.prompt) for r in trace)} prompt and {sum(r.output_len for r in trace)} "
                 f"output tokens; {reps} interleaved repetitions")
    report: dict[str, Any] = {
        "config": {"preset": preset, "dtype": dtype_name, "threads": threads, "num_requests": len(trace),
                   "prompt_tokens": sum(len(r.prompt) for r in trace),
                   "output_tokens": sum(r.output_len for r in trace), "reps": reps,
                   "max_num_seqs": MAX_NUM_SEQS, "machine": platform.machine(),
                   "cpu_isa": cap.isa, "torch": torch.__version__, "quick": quick},
        "peers": {}, "targets": TARGETS,
    }
    vllm: VLLMOffline | None = None
    try:
        t = time.perf_counter()
        vllm = VLLMOffline(hf_dir, dtype_name, cfg.max_seq_len, threads)
        report["peers"]["vllm"] = {"version": vllm.version, "load_s": vllm.load_s,
                                   "threads_bind": vllm.threads_bind}
        progress.log(f"vLLM {vllm.version} loaded in {time.perf_counter() - t:.0f} s")
    except PeerError as e:
        report["peers"]["vllm"] = {"error": str(e)}
        progress.log(f"vLLM cannot run here: {e}")
    ours: list[float] = []
    theirs: list[float] = []
    try:
        engine_offline(LLMEngine(model, tokenizer, max_num_seqs=MAX_NUM_SEQS), trace[:2])  # warm-up
        if vllm is not None:
            vllm.run(trace[:2])
        for rep in range(reps):
            # A fresh engine per run: a reused one would serve the repeated prompts from its cache
            # (vLLM runs with its prefix cache off for the same reason).
            ours.append(engine_offline(LLMEngine(model, tokenizer, max_num_seqs=MAX_NUM_SEQS), trace))
            progress.log(f"rep {rep + 1}/{reps}: fastserve-ray {ours[-1]:,.1f} tok/s")
            if vllm is not None:
                try:
                    theirs.append(vllm.run(trace))
                    progress.log(f"rep {rep + 1}/{reps}: vLLM {theirs[-1]:,.1f} tok/s")
                except PeerError as e:
                    report["peers"]["vllm"]["error"] = str(e)
                    vllm = None
    finally:
        if vllm is not None:
            vllm.close()
    report["offline"] = {"fastserve_ray_tok_s": _summary(ours)}
    rows = [_row("fastserve-ray", ours, 1.0)]
    if theirs:
        report["offline"]["vllm_tok_s"] = _summary(theirs)
        ratio = statistics.median(ours) / statistics.median(theirs)
        report["offline"]["engine_over_vllm"] = ratio
        rows.append(_row("vLLM CPU", theirs, 1 / ratio))
    print_table(["offline engine", "tok/s median", "spread", "vs ours"], rows)
    if theirs:
        print(f"\nengine_tok_s / vllm_tok_s = {report['offline']['engine_over_vllm']:.2f} "
              f"(target >= {TARGETS['offline_vs_vllm']})")
    write_json(report, out, "peers")
    return report
