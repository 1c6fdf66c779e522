"""The CPU decode-attention kernel reads the paged cache in place and equals the PyTorch path.

Every case runs ``paged_attention`` twice on the same step: once with the step's decodes
batched into one native-kernel call, once with the kernel switched off so that each sequence
takes the per-sequence PyTorch path (the reference). Blocks are shuffled, contexts cross block
boundaries and the batch mixes decodes with prefill chunks.
"""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch

from fastserve_ray.capability import refresh as refresh_capability
from fastserve_ray.kernels import native
from fastserve_ray.kernels.paged_decode import paged_decode_kernel
from fastserve_ray.layers import attention
from fastserve_ray.layers.attention import build_attention_metadata, paged_attention
from fastserve_ray.models.cache import build_cache_context


def _step(num_cached: list[int], num_new: list[int], n_heads: int, n_kv: int, head_dim: int,
          block_size: int, dtype: torch.dtype, seed: int = 0):
    """A random step: cache with shuffled blocks, the new K/V written, and its context."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    need = [math.ceil((c + n) / block_size) for c, n in zip(num_cached, num_new)]
    ids = list(range(sum(need) + 3))
    rng.shuffle(ids)
    tables, i = [], 0
    for n in need:
        tables.append(ids[i:i + n])
        i += n
    ctx = build_cache_context(num_cached, num_new, tables, block_size)
    kv = torch.randn(2, len(ids) * block_size, n_kv, head_dim).to(dtype)
    rows = sum(num_new)
    q = torch.randn(rows, n_heads, head_dim).to(dtype)
    k = torch.randn(rows, n_kv, head_dim).to(dtype)
    v = torch.randn(rows, n_kv, head_dim).to(dtype)
    kv[0].index_copy_(0, ctx.slot_mapping, k)
    kv[1].index_copy_(0, ctx.slot_mapping, v)
    return q, k, v, kv, ctx


def _both_paths(monkeypatch, q, k, v, kv, ctx):
    meta = build_attention_metadata(ctx)
    assert meta.decode is not None  # the step's decodes did go to the kernel
    out = paged_attention(q, k, v, kv, meta)
    with monkeypatch.context() as m:
        m.setattr(attention, "paged_decode_kernel", lambda: None)
        ref_meta = build_attention_metadata(ctx)
        assert ref_meta.decode is None
        ref = paged_attention(q, k, v, kv, ref_meta)
    return out, ref


def test_the_kernel_builds_here():
    # CI and the benchmark machine have a C++ compiler: losing the kernel must fail loudly here.
    assert paged_decode_kernel() is not None


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n_heads,n_kv,head_dim,block_size", [
    (8, 8, 64, 16),  # the bench preset's shape
    (4, 2, 16, 8),  # grouped-query heads (the tiny preset)
    (8, 2, 24, 4),  # a head size that is not a multiple of 16 (scalar loop)
])
def test_decodes_equal_the_pytorch_path(monkeypatch, dtype, tol, n_heads, n_kv, head_dim, block_size):
    rng = random.Random(1)
    num_cached = [1, block_size - 1, block_size, 3 * block_size + 1]
    num_cached += [rng.randint(1, 200) for _ in range(12)]
    q, k, v, kv, ctx = _step(num_cached, [1] * len(num_cached), n_heads, n_kv, head_dim, block_size,
                             dtype)
    out, ref = _both_paths(monkeypatch, q, k, v, kv, ctx)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mixed_step_keeps_prefills_on_the_pytorch_path(monkeypatch, dtype):
    # decode, fresh prefill, decode, chunk after a cached prefix, decode
    num_cached, num_new = [40, 0, 7, 24, 100], [1, 13, 1, 9, 1]
    q, k, v, kv, ctx = _step(num_cached, num_new, 4, 2, 16, 8, dtype, seed=3)
    meta = build_attention_metadata(ctx)
    assert meta.decode.rows.tolist() == [0, 14, 24]
    assert [(s.num_cached, s.num_new) for s in meta.spans] == [(0, 13), (24, 9)]
    out, ref = _both_paths(monkeypatch, q, k, v, kv, ctx)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_a_cache_in_another_dtype_takes_the_pytorch_path(monkeypatch):
    q, k, v, kv, ctx = _step([30, 5], [1, 1], 4, 2, 16, 8, torch.float32)
    meta = build_attention_metadata(ctx)
    out = paged_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kv, meta)  # fp32 cache
    ref = paged_attention(q, k, v, kv, meta).bfloat16()
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_switch_off_and_failed_build_fall_back(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built here yet
    native.native_module.cache_clear()
    try:
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        refresh_capability()
        assert not native.native_kernels_enabled() and paged_decode_kernel() is None
        native.native_module.cache_clear()
        monkeypatch.setenv(native.ENV_SWITCH, "1")
        refresh_capability()

        def no_compiler(name, build_dir):
            raise RuntimeError("Error building extension: g++ not found")

        monkeypatch.setattr(native, "_compile", no_compiler)
        with caplog.at_level(logging.WARNING):
            assert paged_decode_kernel() is None
        assert "could not be built (RuntimeError: Error building extension: g++ not found)" in caplog.text
        # Nothing half-built is left to be loaded next time.
        assert [p.suffix for p in (tmp_path / "fastserve").iterdir()] == [".lock"]
        q, k, v, kv, ctx = _step([30, 5], [1, 1], 4, 2, 16, 8, torch.float32)
        meta = build_attention_metadata(ctx)
        assert meta.decode is None and len(meta.spans) == 2  # decodes take the PyTorch path
    finally:
        monkeypatch.undo()
        refresh_capability()
        native.native_module.cache_clear()


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_small_batch_splits_its_tokens_across_threads(monkeypatch, threads, dtype):
    # Fewer sequences than threads: each sequence's blocks are split into runs of whole blocks,
    # one piece per work item, and the pieces' softmaxes merged. Two sequences of 78 tokens
    # (5 blocks of 16) and 9 tokens (part of one block). 2 threads: no split (a sequence per
    # thread); 3 threads: 2 pieces each (2+3 blocks; the short one's first piece is empty);
    # 8 threads: 4 pieces each (1+1+1+2 blocks; the short one leaves 3 empty).
    # Grouped-query heads, 2 per kv head.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, kv, ctx = _step([77, 8], [1, 1], 8, 4, 32, 16, dtype, seed=5)
        out, ref = _both_paths(monkeypatch, q, k, v, kv, ctx)
    finally:
        torch.set_num_threads(before)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
