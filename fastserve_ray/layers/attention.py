"""Attention over the paged K/V cache, and the per-step metadata every layer shares.

A step holds S sequences, each with ``num_new`` new tokens (1 for a decode, a chunk for a
prefill) after ``num_cached`` tokens whose K/V already sit in the cache's blocks. Each
sequence attends over exactly its own ``num_cached + num_new`` keys: nothing is padded to
the longest sequence of the step, and no batch-wide copy of every sequence's K/V is made.

Per sequence, its blocks are read with one ``index_select`` into a scratch tensor of its own
length (a few hundred KiB that stays in the CPU caches while it is read again), then:
  * a decode is two small matmuls with grouped-query heads kept grouped (no
    ``repeat_interleave`` of K/V) and an fp32 softmax;
  * a prefill chunk with nothing cached uses the chunk's own fresh K/V (no cache read) and
    causal SDPA; a chunk after a cached prefix uses SDPA with the offset causal mask.
Measured against the previous batched path (gather of whole, padded sequences with
``aten::index`` and one masked SDPA) on a 64-sequence decode at ~420 tokens of context: about
3x faster per layer on CPU (see docs/engine.md).

On CPU, every decode of the step (one new token after a cached prefix) instead goes to one
call of a native kernel (``fastserve_ray/kernels``) that reads the keys and values straight
from the cache's blocks through the block table: no scratch copy, no transpose, no python loop
over sequences. Measured at batch 64, ~420 tokens of context, bf16: 21 ms -> 2.8 ms per layer
on 2 cores. The per-sequence path above stays for prefill chunks, for GPUs, and wherever the
kernel cannot be built.

``attention="flex"`` in the step's CacheContext (``engine.attention_backend: flex``) replaces
all of the above with one ``flex_attention`` call per layer
over the whole pool (flex_paged.py): the GPU candidate, opt-in until measured on a GPU.

Everything here is built from host-side lengths carried by the CacheContext, so the forward
never waits on the device to learn a shape (no ``.tolist()``, no boolean-mask indexing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastserve_ray.kernels.paged_decode import paged_decode_kernel
from fastserve_ray.layers.flex_attention import FlexMetadata, build_flex_metadata, flex_paged_attention
from fastserve_ray.models.cache import CacheContext


@dataclass
class SeqSpan:
    """One sequence of the step: its rows in the flat batch and where its keys live."""

    row_start: int  # its new tokens are rows [row_start, row_start + num_new)
    num_new: int
    num_cached: int
    blocks: torch.Tensor | None  # (ceil(seq_len / block_size),) block ids; None: nothing cached
    mask: torch.Tensor | None  # (num_new, seq_len) for a chunk after a cached prefix

    @property
    def seq_len(self) -> int:
        """Keys it attends over: cached plus new."""
        return self.num_cached + self.num_new


@dataclass
class DecodeBatch:
    """The step's decodes after a cached prefix, for one native-kernel call per layer."""

    rows: torch.Tensor  # (S,) int64: each decode's query row
    block_tables: torch.Tensor  # (S, W) int64
    seq_lens: torch.Tensor  # (S,) int64: keys each one attends over (its new one included)
    spans: list[SeqSpan]  # the same decodes as spans, for the PyTorch path


@dataclass
class AttentionMetadata:
    """What every layer's attention needs for one step, built once from the CacheContext."""

    spans: list[SeqSpan]  # attended one by one
    block_size: int
    decode: DecodeBatch | None = None  # decodes for the CPU kernel (None: all are in spans)
    flex: FlexMetadata | None = None  # set: every row goes through flex_attention instead
    native: bool = True  # the step may call the native CPU kernels (norm/RoPE, decode layer)


def build_attention_metadata(ctx: CacheContext, num_slots: int | None = None) -> AttentionMetadata:
    """Per-sequence spans from the context's host-side lengths (no device sync).

    On CPU, with the native kernels allowed (``ctx.native_kernels``) and built, decodes after a
    cached prefix are batched into ``decode`` instead of ``spans``. With ``ctx.attention ==
    "flex"`` and the pool's size (``num_slots``) given, the step is one flex_attention mask over
    the pool instead.
    """
    if num_slots is not None and ctx.attention == "flex":
        return AttentionMetadata([], ctx.block_size, flex=build_flex_metadata(ctx, num_slots),
                                 native=ctx.native_kernels)
    device = ctx.block_tables.device
    batch_decodes = device.type == "cpu" and ctx.native_kernels and paged_decode_kernel() is not None
    spans, decodes, decode_seqs = [], [], []
    row = 0
    for s, (num_new, seq_len) in enumerate(zip(ctx.host_query_lens, ctx.host_seq_lens)):
        num_cached = seq_len - num_new
        blocks = mask = None
        if num_cached > 0:
            blocks = ctx.block_tables[s, : -(-seq_len // ctx.block_size)]
            if num_new > 1:
                q_pos = torch.arange(num_cached, seq_len, device=device)
                mask = torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None]
        span = SeqSpan(row, num_new, num_cached, blocks, mask)
        if batch_decodes and num_new == 1 and num_cached > 0:
            decodes.append(span)
            decode_seqs.append(s)
        else:
            spans.append(span)
        row += num_new
    decode = None
    if decodes:
        all_decode = len(decode_seqs) == ctx.block_tables.shape[0]
        tables = ctx.block_tables if all_decode else ctx.block_tables[decode_seqs]
        decode = DecodeBatch(
            rows=torch.tensor([d.row_start for d in decodes], dtype=torch.int64),
            block_tables=tables.contiguous(),
            seq_lens=torch.tensor([d.seq_len for d in decodes], dtype=torch.int64),
            spans=decodes,
        )
    return AttentionMetadata(spans, ctx.block_size, decode, native=ctx.native_kernels)


def paged_attention(
    q: torch.Tensor,  # (N, H, D) new queries, RoPE applied
    k: torch.Tensor,  # (N, Hkv, D) new keys (already written to the cache)
    v: torch.Tensor,  # (N, Hkv, D)
    kv: torch.Tensor,  # (2, num_slots, Hkv, D) this layer's pool
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Each new token attends causally over its own sequence's keys; returns (N, H, D)."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv_heads = k.shape[1]
    groups = n_heads // n_kv_heads
    bs = meta.block_size
    k_blocks = kv[0].view(-1, bs, n_kv_heads, head_dim)
    v_blocks = kv[1].view(-1, bs, n_kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    if meta.flex is not None:
        return flex_paged_attention(q, kv, meta.flex, scale)
    y = torch.empty_like(q)
    spans = meta.spans
    if meta.decode is not None:
        kernel = paged_decode_kernel()
        if kernel is not None and kv.dtype == q.dtype and q.is_contiguous():
            d = meta.decode
            kernel(q, kv[0], kv[1], d.block_tables, d.seq_lens, d.rows, y, bs, scale)
        else:  # a cache in another dtype than the queries: the PyTorch path takes them too
            spans = spans + meta.decode.spans
    for span in spans:
        rows = slice(span.row_start, span.row_start + span.num_new)
        if span.blocks is None:  # nothing cached: the chunk's own K/V are all its keys
            keys, values = k[rows], v[rows]
        else:
            keys = k_blocks.index_select(0, span.blocks).flatten(0, 1)[: span.seq_len]
            values = v_blocks.index_select(0, span.blocks).flatten(0, 1)[: span.seq_len]
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        if span.num_new == 1:
            # (Hkv, G, D) @ (Hkv, D, L): each kv head serves its G query heads in one matmul.
            qg = q[span.row_start].view(n_kv_heads, groups, head_dim) * scale
            scores = torch.matmul(qg, keys.permute(1, 2, 0))  # (Hkv, G, L)
            probs = scores.float().softmax(-1).to(q.dtype)
            out = torch.matmul(probs, values.transpose(0, 1))  # (Hkv, G, D)
            y[span.row_start] = out.view(n_heads, head_dim)
        else:
            # 4-D (1, H, Q, D): PyTorch's fused CPU attention (flash) takes only 4-D inputs; 3-D
            # ones fall back to the unfused math path (bmm, softmax, masks), 5x slower here.
            out = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None],  # (1, H, Q, D)
                keys.transpose(0, 1)[None],  # (1, Hkv, L, D)
                values.transpose(0, 1)[None],
                attn_mask=span.mask,
                is_causal=span.mask is None,
                enable_gqa=groups > 1,
            )
            y[rows] = out[0].transpose(0, 1)
    return y
