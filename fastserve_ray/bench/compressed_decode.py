"""Decode-step speed of compressed execution: int8 / int4 layers vs the float model, fp32 and bf16.

One process, one random model (seeded), its int8 (per-channel) and int4 (group 64) compressed
directories, each served by the engine through the default loader in fp32 and in bf16. For
each batch size the median wall time of engine steps where every sequence decodes, over
interleaved repetitions (A, B, C, A, B, C, ...) so that load on a shared machine hits every
variant alike. Run: ``python -m fastserve_ray.bench.compressed_decode [--quick] [--out F.json]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fastserve_ray.bench.engine import decode_step_seconds
from fastserve_ray.bench.report import print_table, write_json
from fastserve_ray.compress.artifact import write_compressed_model_dir
from fastserve_ray.compress.qtensor import QuantizedWeight
from fastserve_ray.compress.runtime import QuantizedLinear
from fastserve_ray.data import builtin_documents
from fastserve_ray.engine import LLMEngine
from fastserve_ray.models import build_model, get_preset, save_model_dir
from fastserve_ray.models.weights import load_tensors
from fastserve_ray.tokenizer import train_tokenizer

SCHEMES = {"float": None, "int8": (8, None), "int4-g64": (4, 64)}


def _write_dirs(work: Path, preset: str) -> dict[str, Path]:
    texts = [d.text for d, _ in zip(builtin_documents(), range(200))]
    tokenizer = train_tokenizer(texts, vocab_size=get_preset(preset).vocab_size)
    torch.manual_seed(0)
    src = save_model_dir(work / "float", build_model(get_preset(preset)), tokenizer)
    dirs = {"float": src}
    for name, scheme in SCHEMES.items():
        if scheme is None:
            continue
        tensors: dict[str, Any] = dict(load_tensors(src))
        for key, t in tensors.items():
            if t.dim() == 2 and not key.startswith(("embed_tokens", "lm_head")):
                tensors[key] = QuantizedWeight.from_float(t, *scheme)
        dirs[name] = write_compressed_model_dir(work / name, src, tensors, {"bench": name}, {})
    return dirs


def _plans(engine: LLMEngine) -> dict[str, list[str]]:
    """Kernel per batch bucket of each distinct layer shape, as the load-time probe chose."""
    out: dict[str, list[str]] = {}
    for m in engine.runner.model.modules():
        if isinstance(m, QuantizedLinear):
            for dtype, plan in m.plans.items():
                out[f"{str(dtype).removeprefix('torch.')} {m.out_features}x{m.in_features}"] = list(plan)
    return out


def run(out: Path | None, preset: str, batches: tuple[int, ...], steps: int, reps: int) -> dict[str, Any]:
    """Measure every (scheme, dtype, batch); write JSON to ``out`` and print a table."""
    results: dict[str, Any] = {"preset": preset, "threads": torch.get_num_threads(), "steps": steps,
                               "reps": reps, "step_ms": {}, "plans": {}}
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        dirs = _write_dirs(Path(work), preset)
        print(f"[bench compressed-decode] wrote float/int8/int4 dirs in {time.perf_counter() - t0:.1f}s")
        engines = {}
        for dtype in (torch.float32, torch.bfloat16):
            for name, path in dirs.items():
                key = f"{name}/{str(dtype).removeprefix('torch.')}"
                engines[key] = LLMEngine.from_model_dir(
                    path, device="cpu", dtype=dtype, block_size=16, num_blocks=max(batches) * 4 + 8,
                    max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * 16)
                results["plans"][key] = _plans(engines[key])
        vocab = get_preset(preset).vocab_size
        times: dict[str, list[float]] = {}
        for rep in range(reps):
            for batch in batches:
                for key, engine in engines.items():  # interleaved: every variant once per round
                    s = decode_step_seconds(engine, batch, prompt_len=16, steps=steps, vocab=vocab)
                    times.setdefault(f"{key}/b{batch}", []).append(s * 1e3)
            print(f"[bench compressed-decode] round {rep + 1}/{reps} done")
    results["step_ms"] = {k: statistics.median(v) for k, v in times.items()}
    results["step_ms_all"] = times
    rows = []
    for dtype in ("float32", "bfloat16"):
        for batch in batches:
            base = results["step_ms"][f"float/{dtype}/b{batch}"]
            for name in SCHEMES:
                ms = results["step_ms"][f"{name}/{dtype}/b{batch}"]
                rows.append([f"{name} {dtype} b{batch}", f"{ms:.2f}", f"{base / ms:.2f}x",
                             f"{batch / ms * 1e3:.0f}"])
    for key in ("int8", "int4-g64"):
        for dtype in ("float32", "bfloat16"):
            for batch in batches:
                ms = results["step_ms"]
                results[f"{key}_{dtype}_b{batch}_speedup"] = (
                    ms[f"float/{dtype}/b{batch}"] / ms[f"{key}/{dtype}/b{batch}"])
    print_table(["variant", "step ms", "vs float (same dtype)", "tokens/s"], rows)
    write_json(results, out, "compressed-decode")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: --quick for a seconds-long smoke run on the tiny preset."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--preset", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    if args.quick:
        return run(args.out, args.preset or "tiny", (1, 4), steps=4, reps=args.reps or 1)
    return run(args.out, args.preset or "small", (1, 32), steps=32, reps=args.reps or 5)


if __name__ == "__main__":
    main()
