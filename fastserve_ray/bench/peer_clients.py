"""The peer engines as child processes of the peers' own interpreter (`.venv-peers/`).

Each peer runs one of `bench/peer_runners/*.py` under `.venv-peers/bin/python` (made by
`scripts/setup_peers.sh`; nothing is installed at run time) and stays loaded, answering one JSON
request per stdin line with one stdout line prefixed `@@peer ` (their own libraries log to
stdout too). So the bench can interleave repetitions: ours, theirs, ours, ...
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from fastserve_ray.bench.trace import TraceRequest

ROOT = Path(__file__).resolve().parents[2]
RUNNERS = Path(__file__).resolve().parent / "peer_runners"
PEER_MARK = "@@peer "  # the runners' answer lines (peer_runners/*.py MARK)
# The glibc allocator thresholds our own process gets (perf.tune_cpu_allocator), for the peers too.
ALLOCATOR_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(1 << 30)}


class PeerError(RuntimeError):
    """A peer could not be started or failed; the message is its own error."""


def peers_python() -> Path:
    """The peers' interpreter; PeerError naming the set-up script when it is missing."""
    venv = Path(os.environ.get("FASTSERVE_PEERS_VENV", ROOT / ".venv-peers"))
    python = venv / "bin" / "python"
    if not python.is_file():
        raise PeerError(f"{python} not found: run scripts/setup_peers.sh first")
    return python


class PeerProcess:
    """One runner script kept loaded; `ask(request)` -> its answer."""

    name = "peer"

    def __init__(self, runner: str, cfg: dict[str, Any], env: dict[str, str] | None = None) -> None:
        python = peers_python()
        # The child's log lives as long as the child: closed in close(), not in a with-block.
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{self.name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([str(python), str(RUNNERS / runner), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env={**os.environ, **ALLOCATOR_ENV, **(env or {})},
                                     cwd=tempfile.gettempdir())
        hello = self._read()
        self.version, self.load_s = hello["version"], hello["load_s"]
        self.hello = hello

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                raise PeerError(f"{self.name} exited ({self.proc.returncode}): {self._error()}")
            if line.startswith(PEER_MARK):
                out = json.loads(line[len(PEER_MARK):])
                if "error" in out:
                    raise PeerError(f"{self.name}: {out['error']}")
                return out

    def _error(self) -> str:
        self.log.flush()
        lines = Path(self.log.name).read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or ["(no output)"])[-1].strip()[-600:]

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request line, return the answer line (PeerError if the peer failed)."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _tok_s(out: dict[str, Any], trace: list[TraceRequest], name: str) -> float:
    if out["output_lens"] != [r.output_len for r in trace]:
        raise PeerError(f"{name} produced other output lengths: {out['output_lens']}")
    return out["output_tokens"] / out["elapsed_s"]


class VLLMOffline(PeerProcess):
    """vLLM's LLM loaded once; `run(trace)` -> output tokens/s."""

    name = "vLLM"

    def __init__(self, hf_dir: Path, dtype: str, max_model_len: int, threads: int,
                 max_num_seqs: int = 64) -> None:
        # Every core for the engine, as ours gets; FASTSERVE_PEERS_VLLM_BIND=auto is vLLM's own
        # default (one core kept for its front end), to check which of the two serves it best.
        self.threads_bind = os.environ.get("FASTSERVE_PEERS_VLLM_BIND", f"0-{threads - 1}")
        env = {"VLLM_CPU_OMP_THREADS_BIND": self.threads_bind}
        if self.threads_bind != "auto":
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        cfg = {"model": str(hf_dir), "dtype": dtype, "max_model_len": max_model_len,
               "max_num_seqs": max_num_seqs, "kv_cache_gib": 4}
        super().__init__("vllm_offline.py", cfg, env)

    def run(self, trace: list[TraceRequest]) -> float:
        out = self.ask({"prompts": [r.prompt for r in trace], "output_lens": [r.output_len for r in trace]})
        return _tok_s(out, trace, self.name)


GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "q8_0": "q8_0"}


def convert_to_gguf(hf_dir: Path, out: Path, weights: str) -> int:
    """`export-hf` checkpoint -> GGUF (`weights`: float32, bfloat16 or q8_0) with the peers' gguf;
    returns the bytes of its tensors."""
    python = peers_python()
    argv = [str(python), str(RUNNERS / "to_gguf.py"), str(hf_dir), str(out), GGUF_TYPES[weights]]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise PeerError(f"GGUF conversion failed: {(done.stderr or done.stdout).strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["tensor_bytes"]


class LlamaCpp(PeerProcess):
    """llama.cpp on one GGUF file, kept loaded: trace tokens/s (batch 1 or parallel) and decode steps."""

    name = "llama.cpp"

    def __init__(self, gguf: Path, kv_dtype: str, threads: int, parallel: int, max_seq_len: int,
                 n_batch: int = 512) -> None:
        self.parallel = parallel
        # Room for `parallel` sequences at full length (a KV stream each: llama.cpp's default).
        cfg = {"gguf": str(gguf), "n_ctx": parallel * max_seq_len, "n_seq_max": parallel,
               "n_batch": n_batch, "threads": threads, "kv_type": GGUF_TYPES[kv_dtype]}
        super().__init__("llamacpp.py", cfg, {"OMP_NUM_THREADS": str(threads)})

    def run(self, trace: list[TraceRequest], parallel: int | None = None) -> float:
        out = self.ask({"op": "trace", "prompts": [r.prompt for r in trace],
                        "output_lens": [r.output_len for r in trace], "parallel": parallel or self.parallel})
        return _tok_s(out, trace, self.name)

    def decode_step_seconds(self, prompt: list[int], steps: int) -> float:
        return self.ask({"op": "decode_steps", "prompt": prompt, "steps": steps})["step_s"]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        return self.ask({"op": "greedy", "prompt": prompt, "n": n})["tokens"]

    def logits(self, prompt: list[int]) -> list[float]:
        """The last position's logits after ``prompt``."""
        return self.ask({"op": "logits", "prompt": prompt})["logits"]
