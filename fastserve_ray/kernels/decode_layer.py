"""One decoder layer of a batch-1 decode step in one native call (``decode_layer_cpu.cpp``).

At batch 1 the layer's work is small and its Python is not: ~15 module calls, splits, views and
kernel wrappers cost about as much as the norms, RoPE and attention they drive. The native call
runs the same kernels in the same order (results identical to the layer-by-layer path), with no
Python between them.
"""

from __future__ import annotations

from collections.abc import Callable

from fastserve_ray.kernels.native import native_module


def decode_layer_kernel() -> Callable | None:
    """``decode_layer_one_token(x, delta, norms, eps, qkv, qkv_biases, o, o_bias, gate_up, down,
    n_heads, n_kv_heads, head_dim, cos, sin, k_cache, v_cache, slot_mapping, block_tables,
    seq_lens, rows, block_size, scale) -> mlp_out``; x (1, C) bf16 is updated in place.

    None where the native kernels are off, could not be built, or the CPU has no AVX-512 BF16
    (the single-row linear kernel it calls).
    """
    module = native_module()
    if module is None or not module.small_linear_supported():
        return None
    return module.decode_layer_one_token
