"""Paged attention as one ``flex_attention`` call per layer: the GPU candidate.

The whole K/V pool of a layer is treated as one long key sequence of ``num_slots`` slots, and
every new token of the step (decodes and prefill chunks alike) as one query row. A mask says
which slots a row may read: those its own sequence owns (through its block table) at logical
positions up to the row's own. Each step builds, once for all layers, two slot-indexed tables
(owner sequence and logical position) by scattering the block tables, then a ``BlockMask`` that
lets the kernel skip the 128 x 128 tiles with nothing to read. No gather of a sequence's K/V,
no padding to the longest sequence, no python loop over sequences, and no host sync: shapes
come from host-side lengths, and the tables are built with device ops only.

This is vLLM's FlexAttention backend's idea. On CUDA the call is compiled (Triton); on CPU it
runs eagerly, which materialises the scores and is only for tests (the native kernel in
``fastserve_ray/kernels`` is the CPU path). It is opt-in, ``engine.attention_backend: flex``, until a
GPU measurement against the per-sequence path chooses between them; ``auto`` keeps the
measured paths (native kernel on CPU, per-sequence SDPA elsewhere).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fastserve_ray.models.cache import CacheContext

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

@dataclass
class FlexMetadata:
    """One step's mask over the pool, shared by every layer."""

    block_mask: BlockMask


def build_flex_metadata(ctx: CacheContext, num_slots: int) -> FlexMetadata:
    """Owner and logical position of every pool slot for this step's sequences, and the mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = ctx.block_tables.device
    bs = ctx.block_size
    num_seqs, width = ctx.block_tables.shape
    pos = torch.arange(width * bs, device=device)  # logical positions a table can address
    slots = ctx.block_tables[:, pos // bs] * bs + pos % bs  # (S, width * bs)
    valid = pos[None, :] < ctx.seq_lens[:, None]
    # Positions past a sequence's length (and the 0-padding of short tables) scatter into one
    # spare slot at the end, so the scatter needs no boolean indexing (no host sync).
    target = torch.where(valid, slots, torch.full_like(slots, num_slots)).flatten()
    owner = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=device)
    owner.scatter_(0, target, torch.arange(num_seqs, device=device).repeat_interleave(width * bs))
    position = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=device)
    position.scatter_(0, target, pos.repeat(num_seqs))
    q_owner = torch.repeat_interleave(
        torch.arange(num_seqs, dtype=torch.int64),
        torch.tensor(ctx.host_query_lens, dtype=torch.int64),
    ).to(device, non_blocking=True)
    q_pos = ctx.positions

    def may_read(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 (flex_attention's mask_mod)
        return (owner[kv_idx] == q_owner[q_idx]) & (position[kv_idx] <= q_pos[q_idx])

    mask = create_block_mask(may_read, None, None, int(q_pos.shape[0]), num_slots, device=device)
    return FlexMetadata(mask)


@functools.cache
def _compiled_flex():  # noqa: ANN202 (returns torch.compile's wrapper)
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_paged_attention(
    q: torch.Tensor,  # (N, H, D) new queries, RoPE applied
    kv: torch.Tensor,  # (2, num_slots, Hkv, D) this layer's pool, new K/V already written
    meta: FlexMetadata,
    scale: float,
) -> torch.Tensor:
    """Each new token attends over its own sequence's slots up to its position; (N, H, D)."""
    from torch.nn.attention.flex_attention import flex_attention

    n_heads, n_kv_heads = q.shape[1], kv.shape[2]
    query = q.transpose(0, 1)[None]  # (1, H, N, D)
    keys = kv[0].to(q.dtype).permute(1, 0, 2)[None]  # (1, Hkv, num_slots, D)
    values = kv[1].to(q.dtype).permute(1, 0, 2)[None]
    fn = _compiled_flex() if q.is_cuda else flex_attention
    out = fn(query, keys, values, block_mask=meta.block_mask, scale=scale,
             enable_gqa=n_heads != n_kv_heads)
    return out[0].transpose(0, 1)
