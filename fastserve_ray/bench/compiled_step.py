"""Decode-step time with engine.compile on and off, and the start-up cost of compiling.

``python -m fastserve_ray.bench.compiled_step [--preset bench] [--batches 1,8,32]``: builds a
ModelRunner each way on the same weights, gives every sequence ~420 cached tokens (zeros: the
cost of reading them is the same) and times ``runner.execute`` of a decode-only step, the two
runners alternating (minimum and median of the repeats, after an untimed warm-up). The compile
start-up is timed with an empty inductor cache (cold) unless ``--warm-cache`` is given, since
a second start on the same machine reuses compiled kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from typing import Any

import torch

from fastserve_ray.engine.model_runner import ModelInput, ModelRunner
from fastserve_ray.models import build_model, get_preset
from fastserve_ray.models.cache import build_cache_context


def _decode_input(batch: int, context: int, block_size: int, device: torch.device) -> ModelInput:
    width = math.ceil((context + 1) / block_size)
    tables = [list(range(b * width, (b + 1) * width)) for b in range(batch)]
    ctx = build_cache_context([context] * batch, [1] * batch, tables, block_size, device)
    ids = torch.randint(0, 100, (batch,), device=device)
    return ModelInput(ids, ctx, torch.arange(batch, device=device), batch)


def time_steps(runners: list[ModelRunner], batch: int, context: int,
               repeats: int) -> list[list[float]]:
    """Seconds of decode steps of ``batch`` sequences at ``context`` cached tokens, per runner.

    The runners' steps alternate, so that load from other processes (this machine is shared)
    falls on all of them alike.
    """
    inputs = [_decode_input(batch, context, r.block_size, r.device) for r in runners]
    for runner, model_input in zip(runners, inputs):
        runner.execute(model_input)  # warm-up (kernels, allocator)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for runner, model_input, out in zip(runners, inputs, times):
            t0 = time.perf_counter()
            runner.execute(model_input)
            out.append(time.perf_counter() - t0)
    return times


def measure(preset: str, batches: list[int], context: int, repeats: int,
            max_num_seqs: int) -> dict[str, Any]:
    """Step medians (ms) compile off/on per batch, and the compile start-up (s)."""
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    block_size = 16
    num_blocks = max(batches) * math.ceil((context + 1) / block_size)
    eager = ModelRunner(model, num_blocks=num_blocks, block_size=block_size)
    compiled = ModelRunner(model, num_blocks=num_blocks, block_size=block_size, compile=True,
                           max_num_seqs=max_num_seqs)
    t0 = time.perf_counter()
    compiled.compile_decode_buckets(model.config.max_seq_len)
    startup = time.perf_counter() - t0
    rows = []
    for batch in batches:
        eager_t, compiled_t = time_steps([eager, compiled], batch, context, repeats)
        # The minimum estimates the machine's cost (other processes only ever add time).
        off, on = min(eager_t), min(compiled_t)
        rows.append({"batch": batch, "eager_ms": off * 1e3, "compiled_ms": on * 1e3,
                     "eager_median_ms": statistics.median(eager_t) * 1e3,
                     "compiled_median_ms": statistics.median(compiled_t) * 1e3,
                     "speedup": off / on})
        print(f"batch {batch:3d}: eager {off * 1e3:7.1f} ms  compiled {on * 1e3:7.1f} ms  "
              f"({off / on:.2f}x; min of {repeats}, medians "
              f"{statistics.median(eager_t) * 1e3:.1f} / {statistics.median(compiled_t) * 1e3:.1f})",
              flush=True)
    return {"preset": preset, "context": context, "dtype": str(next(model.parameters()).dtype),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "buckets": list(compiled.compiled.buckets) if compiled.compiled else [],
            "compile_startup_s": startup, "steps": rows}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=420)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="largest decode bucket")
    ap.add_argument("--warm-cache", action="store_true",
                    help="reuse the inductor cache (default: a fresh one, i.e. a cold start)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; 1 is steadier on a shared machine)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    # No inference_mode around this: the runner's execute() enters it itself, as in the engine.
    result = measure(args.preset, [int(b) for b in args.batches.split(",")], args.context,
                     args.repeats, args.max_num_seqs)
    print(f"compile start-up ({len(result['buckets'])} buckets, "
          f"{'warm' if args.warm_cache else 'cold'} cache): {result['compile_startup_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
