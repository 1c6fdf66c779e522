"""Choosing a compressed layer's kernel by measurement, per shape, dtype and batch-size bucket.

``probe_layer`` times every kernel that fits a ``QuantizedLinear`` (and checks each one's output
against the dequantized reference, so a kernel that silently computes the wrong thing for a
shape is never chosen); ``probe_fused`` decides, per bucket, whether a ``QuantizedFusedLinear``'s
one native call beats its members run one by one. Results are kept per process, keyed by what
decides them (device, dtype, shapes, format), so a model's many same-shaped layers cost one
probe; ``clear_plan_caches()`` forgets them (tests, benchmarks that compare cold starts).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fastserve_ray.quantized.fused import QuantizedFusedLinear
    from fastserve_ray.quantized.linear import QuantizedLinear

# Batch-size buckets (rows of the flattened activation): a plan holds one kernel per bucket,
# measured at the bucket's representative size. Decode batches land in the first three.
BUCKETS = ((2, 1), (16, 8), (64, 32), (None, 128))  # (upper bound inclusive | None, probe M)


def bucket_of(m: int) -> int:
    """Index of the batch-size bucket that ``m`` activation rows fall in."""
    for i, (upper, _) in enumerate(BUCKETS):
        if upper is None or m <= upper:
            return i
    return len(BUCKETS) - 1


@dataclass(frozen=True)
class _ProbeKey:
    device: str
    dtype: torch.dtype
    n: int
    k: int
    bits: int
    group_size: int
    available: tuple[str, ...]
    has_bias: bool


_PLAN_CACHE: dict[_ProbeKey, tuple[str, ...]] = {}


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _tolerance(dtype: torch.dtype, name: str) -> float:
    # Relative to the output's scale: bf16 arithmetic (every kernel but dequant in fp32) rounds
    # at 2^-8; dynamic int8 also rounds activations to 8 bits.
    if name == "dynamic_int8":
        return 0.05
    return 1e-4 if (dtype == torch.float32 and name == "dequant") else 0.03


def probe_layer(layer: QuantizedLinear, dtype: torch.dtype, repeats: int = 3) -> tuple[str, ...]:
    """Time every fitting kernel at each bucket's batch size; the fastest correct one per bucket.

    Results are cached per (device, dtype, shape, format) for the process, so a model's many
    same-shaped layers cost one probe. Candidates are timed interleaved (round-robin) so that
    a burst of load on a shared machine hits them alike.
    """
    key = _ProbeKey(str(layer.scale.device), dtype, layer.out_features, layer.in_features,
                    layer.bits, layer.group_size, layer.available, layer.bias is not None)
    if key in _PLAN_CACHE:
        return _PLAN_CACHE[key]
    if len(layer.available) == 1:
        plan = (layer.available[0],) * len(BUCKETS)
        _PLAN_CACHE[key] = plan
        return plan
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Dequantizing the int4 kernel layout means running the kernel on an identity matrix: never
    # competitive, so not a candidate there (it still serves as the reference, computed once).
    candidates = [k for k in layer.available if not (k == "dequant" and layer.storage == "int4pack")]
    plan = []
    with torch.inference_mode():
        w_ref = layer.dequantize(torch.float32)
        bias = None if layer.bias is None else layer.bias.float()
        for _, m in BUCKETS:
            x = torch.randn(m, layer.in_features, generator=gen).to(layer.scale.device, dtype)
            ref = F.linear(x.float(), w_ref, bias)
            scale = ref.abs().max().item() or 1.0
            ok = []
            for name in candidates:
                try:
                    err = (layer.run_kernel(name, x).float() - ref).abs().max().item() / scale
                except RuntimeError:
                    continue  # the op refused this shape/dtype on this build: not a candidate
                if err <= _tolerance(dtype, name):
                    ok.append(name)
            times: dict[str, list[float]] = {name: [] for name in ok}
            for _ in range(repeats):
                for name in ok:
                    times[name].append(_median_us(lambda n=name, x=x: _sync(layer.run_kernel(n, x)), 2))
            plan.append(min(ok, key=lambda n: statistics.median(times[n])) if ok else "dequant")
    result = tuple(plan)
    _PLAN_CACHE[key] = result
    return result


# The fused call is a candidate up to this many rows: decode batches. Beyond them each member
# runs its own plan (oneDNN-backed kernels are made for many rows).
FUSED_MAX_PROBE_ROWS = 8
_FUSED_PLAN_CACHE: dict[tuple, tuple[bool, ...]] = {}


def clear_plan_caches() -> None:
    """Forget every probed plan of this process (the next layer built probes again)."""
    _PLAN_CACHE.clear()
    _FUSED_PLAN_CACHE.clear()


def probe_fused(fused: QuantizedFusedLinear, dtype: torch.dtype, repeats: int = 3) -> tuple[bool, ...]:
    """Per batch bucket, whether one fused call beats the members run one by one (each with its
    probed plan), timed interleaved at the bucket's size; a fused result that differs from the
    members' beyond bf16 rounding is never chosen. Cached per (device, dtype, member shapes)."""
    device = fused.members[0].scale.device
    key = (str(device), dtype, tuple((m.out_features, m.in_features) for m in fused.members))
    if key in _FUSED_PLAN_CACHE:
        return _FUSED_PLAN_CACHE[key]
    gen = torch.Generator(device="cpu").manual_seed(0)
    plan = []
    with torch.inference_mode():
        for _, m in BUCKETS:
            if m > FUSED_MAX_PROBE_ROWS:
                plan.append(False)
                continue
            x = torch.randn(m, fused.in_features, generator=gen).to(device, dtype)
            ref = fused.run_members(x).float()
            err = (fused.run_fused(x).float() - ref).abs().max().item() / (ref.abs().max().item() or 1.0)
            if err > _tolerance(dtype, "int8row"):
                plan.append(False)
                continue
            t_fused, t_members = [], []
            for _ in range(repeats):
                t_fused.append(_median_us(lambda x=x: _sync(fused.run_fused(x)), 2))
                t_members.append(_median_us(lambda x=x: _sync(fused.run_members(x)), 2))
            plan.append(statistics.median(t_fused) <= statistics.median(t_members))
    result = tuple(plan)
    _FUSED_PLAN_CACHE[key] = result
    return result


def _sync(y: torch.Tensor) -> torch.Tensor:
    if y.device.type == "cuda":
        torch.cuda.synchronize(y.device)
    return y
