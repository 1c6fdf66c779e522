"""The CPU kernels for a decoder layer's per-token glue (``norm_rope_cpu.cpp``).

``add_rms_norm`` (residual add + RMSNorm) and ``rope_write_cache`` (RoPE of q and k + the paged
cache write) each replace a chain of small PyTorch ops that costs more in dispatch than in work
at decode batch sizes. Both return None where they do not apply, and the caller then runs its
PyTorch reference path, which computes the same values: not on CPU, autograd wanted, mixed
dtypes, traced by ``torch.compile``, or no native module.
"""

from __future__ import annotations

import torch

from fastserve_ray.kernels.native import native_module

_DTYPES = (torch.float32, torch.bfloat16)


def _applies(*tensors: torch.Tensor) -> bool:
    # Called ~20 times a decode step, so only cheap checks here: the kernels themselves refuse
    # tensors that are not on the CPU.
    dtype = tensors[0].dtype
    if dtype not in _DTYPES or tensors[0].device.type != "cpu":
        return False
    for t in tensors:
        if t.dtype != dtype:
            return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not torch.compiler.is_compiling()


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x + delta, rms_norm(x + delta) * weight)`` for 2-D ``x`` (N, C), in one pass.

    ``x`` is updated in place (the residual stream: the caller owns it). None where the
    kernel does not apply.
    """
    tensors = (x, weight) if delta is None else (x, delta, weight)
    if x.dim() != 2 or not x.is_contiguous() or not _applies(*tensors):
        return None
    if delta is not None and (delta.shape != x.shape or not delta.is_contiguous()):
        return None
    module = native_module()
    if module is None:
        return None
    h = torch.empty_like(x)
    module.add_rms_norm(x, delta, weight, eps, h)
    return x, h


def rope_write_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor | None:
    """RoPE on q (N, H, D) and k (N, Hkv, D), then k and v into ``kv`` (2, slots, Hkv, D).

    Returns the rotated q as a new contiguous tensor; k is rotated in place. q, k and v may be
    row-strided views (the split of a fused q|k|v product). None where the kernel does not
    apply, and then nothing was written.
    """
    if not _applies(q, k, v, cos, sin, kv) or not kv[0].is_contiguous():
        return None
    if not (cos.is_contiguous() and sin.is_contiguous() and slot_mapping.dtype == torch.int64):
        return None
    if any(t.stride(-1) != 1 or t.stride(-2) != t.shape[-1] for t in (q, k, v)):
        return None
    module = native_module()
    if module is None:
        return None
    q_out = torch.empty(q.shape, dtype=q.dtype)
    module.rope_write_cache(q, q_out, k, v, cos, sin, kv[0], kv[1], slot_mapping.contiguous())
    return q_out
