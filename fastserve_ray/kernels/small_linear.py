"""The CPU kernel for linears of a few bf16 rows (``small_linear_cpu.cpp``): decode's GEMVs."""

from __future__ import annotations

from collections.abc import Callable

from fastserve_ray.kernels.native import native_module

# Up to this many rows the engine calls the kernel rather than oneDNN's packed GEMM. Measured on
# 2 cores, bench preset, bf16, 420 tokens of context: a whole decode step at batch 1 went from
# 6.9 to 6.2 ms; at batch 2 and 3 it was no faster (each weight's sums then cost more
# horizontal adds than its bytes cost to read), so larger batches keep oneDNN. The kernel
# itself takes any number of rows.
MAX_ROWS = 1


def small_linear_kernel() -> Callable | None:
    """``small_linear(x, weights, biases, out)``: out = x @ cat(weights).T + cat(biases).

    x (M, K) and out (M, sum N_i) bf16 with contiguous rows, each weight a contiguous bf16
    (N_i, K), each bias a bf16 (N_i,) or None. None where the native kernels are off, could
    not be built, or the CPU has no AVX-512 BF16.
    """
    module = native_module()
    if module is None or not module.small_linear_supported():
        return None
    return module.small_linear


def small_linear_int8_kernel() -> Callable | None:
    """``small_linear_int8(x, qs, scales, out)``: out = [x @ q_1.T * scale_1, ...], int8
    per-channel weights side by side (a fused q|k|v or gate|up in one call).

    x (M, K) and out (M, sum N_i) bf16 with contiguous rows, each q a contiguous int8 (N_i, K),
    each scale a contiguous fp32 (N_i,). None where ``small_linear_kernel()`` is None.
    """
    module = native_module()
    if module is None or not module.small_linear_supported():
        return None
    return module.small_linear_int8
