"""Decode-step speed of compressed execution: the measuring half of `fastserve-ray bench compress`.

Given a float model directory and its compressed directories (from the same run), each is served
by the engine through the default loader in every requested dtype. For each batch size we time
the engine steps in which every sequence decodes (prefill excluded) and keep their median; the
variants run interleaved (A, B, C, A, B, C, ...) so that load on a shared machine hits every
variant alike. One untimed warm-up pass per engine comes first (allocator, kernel plans, caches).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from fastserve_ray.bench.engine import decode_step_seconds
from fastserve_ray.engine import LLMEngine
from fastserve_ray.quantized.linear import QuantizedLinear


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _plans(engine: LLMEngine) -> dict[str, list[str]]:
    """Kernel per batch bucket of each distinct layer shape, as the load-time probe chose."""
    out: dict[str, list[str]] = {}
    for m in engine.runner.model.modules():
        if isinstance(m, QuantizedLinear):
            for dtype, plan in m.plans.items():
                out[f"{dtype_name(dtype)} {m.out_features}x{m.in_features}"] = list(plan)
    return out


def _spread(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "all": xs}


def measure_decode_steps(dirs: dict[str, Path], dtypes: tuple[torch.dtype, ...], batches: tuple[int, ...],
                         steps: int, reps: int, vocab: int, baseline: str = "uncompressed",
                         log: str = "[bench compress]") -> dict[str, Any]:
    """Interleaved decode-step timings of every (model dir, dtype, batch).

    Returns ``{"step_ms": {"<name>/<dtype>/b<batch>": {median, min, max, n, all}},
    "speedup": {"<name>/<dtype>/b<batch>": baseline median / variant median}, "plans": ...}``:
    speed-ups compare each variant with ``dirs[baseline]`` in the same dtype and batch size.
    """
    if reps < 1 or steps < 2:
        raise ValueError(f"decode bench needs reps >= 1 and steps >= 2, got reps={reps}, steps={steps}")
    engines: dict[str, LLMEngine] = {}
    plans: dict[str, Any] = {}
    for dtype in dtypes:
        for name, path in dirs.items():
            key = f"{name}/{dtype_name(dtype)}"
            engines[key] = LLMEngine.from_model_dir(
                path, device="cpu", dtype=dtype, block_size=16, num_blocks=max(batches) * 4 + 8,
                max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * 16)
            plans[key] = _plans(engines[key])
    for engine in engines.values():  # warm-up, untimed
        for batch in batches:
            decode_step_seconds(engine, batch, prompt_len=16, steps=2, vocab=vocab)
    print(f"{log} decode: {len(engines)} engines warmed up", flush=True)
    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for batch in batches:
            for key, engine in engines.items():  # interleaved: every variant once per round
                s = decode_step_seconds(engine, batch, prompt_len=16, steps=steps, vocab=vocab)
                times.setdefault(f"{key}/b{batch}", []).append(s * 1e3)
        print(f"{log} decode round {rep + 1}/{reps} done", flush=True)
    step_ms = {k: _spread(v) for k, v in times.items()}
    speedup = {}
    for key, v in step_ms.items():
        name, rest = key.split("/", 1)
        if name != baseline:
            speedup[key] = step_ms[f"{baseline}/{rest}"]["median"] / v["median"]
    return {"step_ms": step_ms, "speedup": speedup, "plans": plans, "steps": steps, "reps": reps,
            "batches": list(batches), "dtypes": [dtype_name(d) for d in dtypes],
            "threads": torch.get_num_threads()}
