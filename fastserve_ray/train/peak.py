"""The one peak-FLOP/s probe every MFU figure divides by: same GEMM size and repeats everywhere.

It is measured once, on an idle device, before training starts (by the trainer in
a Ray task with a worker's resources, or by the benchmark) and passed to the
workers; never re-measured per rank while other workers load the machine.
"""

from __future__ import annotations

import os

import torch

from fastserve_ray.perf import measure_gemm_flops

GPU_SIZE, CPU_SIZE, REPEATS = 4096, 1024, 5


def probe_peak_flops(device: torch.device | str = "cpu", threads: int | None = None) -> float:
    """FLOP/s of the GEMM probe on ``device`` (bf16 on GPU; fp32 on CPU with ``threads`` threads,
    default all of this node's cores)."""
    device = torch.device(device)
    if device.type == "cuda":
        return measure_gemm_flops(device, torch.bfloat16, size=GPU_SIZE, repeats=REPEATS)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return measure_gemm_flops(device, torch.float32, size=CPU_SIZE, repeats=REPEATS)
    finally:
        torch.set_num_threads(before)
