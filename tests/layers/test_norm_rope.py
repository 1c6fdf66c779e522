"""The native residual-add + RMSNorm and RoPE + cache-write kernels equal the PyTorch reference
of models/llama.py: bit for bit in bf16 (every rounding reproduced), to fp32 rounding in fp32."""

from __future__ import annotations

import pytest
import torch

from fastserve_ray.capability import capability
from fastserve_ray.kernels import norm_rope
from fastserve_ray.kernels.native import native_module
from fastserve_ray.layers.norm import RMSNorm
from fastserve_ray.layers.rotary import RotaryEmbedding, apply_rope

NO_KERNELS = (capability().lacks("native_kernels") or "the native kernels failed to build")

module = native_module()
pytestmark = pytest.mark.skipif(module is None, reason=NO_KERNELS)


def _norm(dim: int, dtype: torch.dtype, seed: int) -> RMSNorm:
    torch.manual_seed(seed)
    norm = RMSNorm(dim, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim) * 2)
    return norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,dim", [(1, 256), (5, 100), (300, 512)])  # decode, odd width, prefill
def test_add_rms_norm_matches_the_reference(dtype, rows, dim):
    norm = _norm(dim, dtype, rows)
    x = (torch.randn(rows, dim) * 3).to(dtype)
    delta = torch.randn(rows, dim).to(dtype)
    with torch.inference_mode():
        ref_x = x + delta
        ref_h = norm(ref_x)
        stream = x.clone()
        out_x, out_h = norm_rope.add_rms_norm(stream, delta, norm.weight, norm.eps)
    assert out_x is stream  # the residual stream is updated in place
    assert torch.equal(out_x, ref_x)
    if dtype == torch.bfloat16:
        assert torch.equal(out_h, ref_h)
    else:  # the fp32 sum of squares is added up in another order
        torch.testing.assert_close(out_h, ref_h, rtol=1e-6, atol=1e-6)


def test_add_rms_norm_without_delta_leaves_x_alone():
    norm = _norm(64, torch.bfloat16, 0)
    x = torch.randn(3, 64).bfloat16()
    before = x.clone()
    with torch.inference_mode():
        out_x, out_h = norm_rope.add_rms_norm(x, None, norm.weight, norm.eps)
        assert torch.equal(out_h, norm(before))
    assert torch.equal(out_x, before)


def _qkv(rows: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype):
    fused = torch.randn(rows, (heads + 2 * kv_heads) * dim).to(dtype)
    q, k, v = fused.split((heads * dim, kv_heads * dim, kv_heads * dim), -1)
    return q.view(rows, heads, dim), k.view(rows, kv_heads, dim), v.view(rows, kv_heads, dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,heads,kv_heads,dim", [(1, 8, 4, 64), (7, 4, 4, 32), (200, 4, 2, 64)])
def test_rope_write_cache_matches_the_reference(dtype, rows, heads, kv_heads, dim):
    torch.manual_seed(rows)
    q, k, v = _qkv(rows, heads, kv_heads, dim, dtype)  # row-strided views of one product
    positions = torch.randint(0, 2000, (rows,))
    cos, sin = RotaryEmbedding(dim, 10000.0)(positions, dtype)
    ref_q, ref_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ref_v = v.clone()
    kv = torch.full((2, 3 * rows, kv_heads, dim), float("nan"), dtype=dtype)
    slots = torch.randperm(3 * rows)[:rows]
    with torch.inference_mode():
        out_q = norm_rope.rope_write_cache(q, k, v, cos, sin, kv, slots)
    assert out_q.is_contiguous() and torch.equal(out_q, ref_q)
    assert torch.equal(k, ref_k)  # k rotated in place
    assert torch.equal(kv[0][slots], ref_k) and torch.equal(kv[1][slots], ref_v)
    untouched = torch.ones(3 * rows, dtype=torch.bool)
    untouched[slots] = False
    assert kv[:, untouched].isnan().all()  # no other slot written


def test_falls_back_where_it_does_not_apply():
    norm = _norm(32, torch.float32, 1)
    x = torch.randn(2, 32, requires_grad=True)
    assert norm_rope.add_rms_norm(x, None, norm.weight, norm.eps) is None  # autograd wanted
    with torch.inference_mode():
        mixed = torch.randn(2, 32).bfloat16()
        assert norm_rope.add_rms_norm(mixed, None, norm.weight, norm.eps) is None  # dtypes differ
        q, k, v = _qkv(2, 2, 2, 16, torch.float32)
        cos, sin = RotaryEmbedding(16, 10000.0)(torch.arange(2), torch.float32)
        bf16_cache = torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16)
        assert norm_rope.rope_write_cache(q, k, v, cos, sin, bf16_cache, torch.arange(2)) is None
        assert bf16_cache.eq(0).all()


def test_bad_slot_is_a_clear_error_and_writes_nothing():
    q, k, v = _qkv(2, 2, 2, 16, torch.float32)
    cos, sin = RotaryEmbedding(16, 10000.0)(torch.arange(2), torch.float32)
    kv = torch.zeros(2, 4, 2, 16)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="slot 9 is outside the cache's 4 slots"):
        norm_rope.rope_write_cache(q, k, v, cos, sin, kv, torch.tensor([0, 9]))
    assert kv.eq(0).all()


def test_shape_mismatch_names_the_tensor():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="delta must be a contiguous"):
        module.add_rms_norm(x, torch.randn(3, 8), torch.ones(8), 1e-5, torch.empty_like(x))
