"""The CPU decode-attention kernel that reads the paged K/V cache in place (``paged_decode_cpu.cpp``)."""

from __future__ import annotations

from collections.abc import Callable

from fastserve_ray.kernels.native import native_module


def paged_decode_kernel() -> Callable | None:
    """``paged_decode(q, k_cache, v_cache, block_tables, seq_lens, rows, out, block_size, scale)``.

    None where the native kernels are switched off or could not be built.
    """
    module = native_module()
    return None if module is None else module.paged_decode
