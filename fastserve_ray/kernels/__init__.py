"""Native kernels the models call where PyTorch has no fast op: built on first use, optional.

The C++ sources here (``paged_decode_cpu.cpp``: decode attention over the paged cache;
``small_linear_cpu.cpp``: bf16 and int8-weight linears of a few rows; ``norm_rope_cpu.cpp``:
residual add + RMSNorm, and RoPE + the cache write; ``bindings.cpp``) are compiled into one
module with ``torch.utils.cpp_extension`` the first time a machine needs it (about 40-60 s on
2 cores; kept on disk afterwards, see ``native.py`` for how a build survives crashes and
races). Where it cannot be built (no compiler, an unsupported CPU) or
``FASTSERVE_NATIVE_KERNELS=0`` is set, callers fall back to their PyTorch paths, which compute
the same thing.
"""
