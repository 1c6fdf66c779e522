"""An optional ``torch.compile``d decode step for Llama models, with static batch buckets.

Only decode-only steps (every scheduled sequence has exactly one new token) take this path;
prefill and mixed steps run the eager ``forward_cached``. A decode batch of B sequences is
padded up to the next bucket (1, 2, 4, 8, ... up to ``max_num_seqs``) so that each bucket
compiles once; the padded rows are dummies that write their K/V into a scratch block that the
block manager never hands out and attend only to it, so they cannot touch real K/V.

The compiled function is written with tensor ops only (no ``.tolist()``, ``.item()`` or
boolean-mask indexing, whose host syncs would break the graph). Attention gathers each
sequence's blocks through its (B, W) block table and masks keys past its length; W (blocks of
the longest context in the step) is a dynamic dimension, so the growing context does not
recompile.

The cache is one tensor per layer (separate storage): an in-place write into a view of one big
(layers, ...) tensor makes the compiled graph copy that whole tensor every step (AOTAutograd
handles mutated aliasing inputs through a synthetic base), while per-layer bases are updated
in place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

from fastserve_ray.layers.rotary import apply_rope
from fastserve_ray.models.cache import CacheContext
from fastserve_ray.models.llama import LlamaModel

log = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Powers of two up to (and including) the first one >= ``max_num_seqs``."""
    buckets = [1]
    while buckets[-1] < max_num_seqs:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def bucket_for(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``batch`` rows."""
    for b in buckets:
        if b >= batch:
            return b
    raise ValueError(f"decode batch {batch} exceeds the largest bucket {buckets[-1]}")


def decode_forward(
    model: LlamaModel,
    layer_caches: Sequence[torch.Tensor],  # per layer (2, num_slots, Hkv, D), separate storage
    input_ids: torch.Tensor,  # (B,)
    positions: torch.Tensor,  # (B,)
    slot_mapping: torch.Tensor,  # (B,)
    block_tables: torch.Tensor,  # (B, W)
    seq_lens: torch.Tensor,  # (B,)
    block_size: int,
) -> torch.Tensor:
    """Logits (B, vocab) for one new token per sequence; writes its K/V into ``layer_caches``."""
    cfg = model.config
    n_heads, n_kv, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    groups = n_heads // n_kv
    batch, width = block_tables.shape
    num_keys = width * block_size
    x = model.embed_tokens(input_ids)  # (B, C)
    cos, sin = model.rotary(positions, x.dtype)  # (B, D)
    # Keys at or past a sequence's length are padding (its last block's tail, shorter tables).
    key_pos = torch.arange(num_keys, device=input_ids.device)
    pad = key_pos[None, :] >= seq_lens[:, None]  # (B, L)
    bias = torch.zeros(pad.shape, dtype=torch.float32, device=pad.device).masked_fill(
        pad, float("-inf")
    )[:, None, None, :]  # (B, 1, 1, L)
    scale = 1.0 / math.sqrt(head_dim)
    kv_index = torch.cat([torch.zeros_like(slot_mapping), torch.ones_like(slot_mapping)])
    kv_slots = torch.cat([slot_mapping, slot_mapping])
    for layer, kv in zip(model.layers, layer_caches):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(batch, n_heads, head_dim)
        k = attn.k_proj(h).view(batch, n_kv, head_dim)
        v = attn.v_proj(h).view(batch, n_kv, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # One index_put_ on the layer's base tensor (not index_copy_ into kv[0]/kv[1] views):
        # a mutation through a view is functionalized into a copy of the whole base.
        kv.index_put_((kv_index, kv_slots), torch.cat([k, v]).to(kv.dtype))
        k_blocks = kv[0].view(-1, block_size, n_kv, head_dim)
        v_blocks = kv[1].view(-1, block_size, n_kv, head_dim)
        flat = block_tables.reshape(-1)
        keys = k_blocks.index_select(0, flat).view(batch, num_keys, n_kv, head_dim).to(q.dtype)
        values = v_blocks.index_select(0, flat).view(batch, num_keys, n_kv, head_dim).to(q.dtype)
        qg = q.view(batch, n_kv, groups, head_dim) * scale
        scores = torch.matmul(qg, keys.permute(0, 2, 3, 1))  # (B, Hkv, G, L)
        probs = (scores.float() + bias).softmax(-1).to(q.dtype)
        out = torch.matmul(probs, values.transpose(1, 2))  # (B, Hkv, G, D)
        x = x + attn.o_proj(out.reshape(batch, n_heads * head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))


class CompiledDecode:
    """Runs decode-only steps of a Llama model through ``torch.compile`` in batch buckets."""

    def __init__(
        self,
        model: LlamaModel,
        layer_caches: Sequence[torch.Tensor],
        block_size: int,
        scratch_block: int,
        max_num_seqs: int,
    ) -> None:
        self.model = model
        self.layer_caches = list(layer_caches)
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = batch_buckets(max_num_seqs)
        # Every bucket is a graph of the same function, and every model (each engine of a
        # benchmark, each test) adds its own: dynamo's default limit of 8 per function would
        # silently send the rest back to eager.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        # dynamic=False: the batch dimension is static per bucket; the block-table width is
        # marked dynamic per call (see run), so contexts growing step by step do not recompile.
        self._fn: Callable[..., torch.Tensor] = torch.compile(decode_forward, dynamic=False)

    @staticmethod
    def applies(ctx: CacheContext) -> bool:
        """Whether a step is decode-only: one new token for every sequence."""
        return all(n == 1 for n in ctx.host_query_lens)

    def run(self, input_ids: torch.Tensor, ctx: CacheContext) -> torch.Tensor:
        """Logits (S, vocab) for the S real rows of a decode-only step."""
        num_seqs = len(ctx.host_query_lens)
        batch = bucket_for(num_seqs, self.buckets)
        pad_rows = batch - num_seqs
        device = input_ids.device
        scratch = self.scratch_block
        # The inputs are always built here, even without padding: tensors made under the
        # caller's inference mode differ in dispatch keys from those made outside it, and each
        # kind would compile its own graph. At least 2 blocks wide: dynamo specialises sizes 0/1.
        width = max(2, ctx.block_tables.shape[1])
        tables = torch.full((batch, width), scratch, dtype=torch.int64, device=device)
        tables[:num_seqs, : ctx.block_tables.shape[1]] = ctx.block_tables
        # Padded rows: token 0 at position 0 of the scratch block, a context of one key (their
        # own), so their softmax stays finite and they never read or write real K/V.
        zeros = torch.zeros(pad_rows, dtype=torch.int64, device=device)
        input_ids = torch.cat([input_ids, zeros])
        positions = torch.cat([ctx.positions, zeros])
        slots = torch.cat([ctx.slot_mapping, zeros + scratch * self.block_size])
        seq_lens = torch.cat([ctx.seq_lens, zeros + 1])
        torch._dynamo.mark_dynamic(tables, 1)
        logits = self._fn(
            self.model, self.layer_caches, input_ids, positions, slots, tables, seq_lens,
            self.block_size,
        )
        return logits[:num_seqs]

    def warm_up(self, max_width: int) -> None:
        """Compile every bucket now (start-up), writing only the scratch block."""
        device = self.layer_caches[0].device
        for batch in self.buckets:
            ids = torch.zeros(batch, dtype=torch.int64, device=device)
            ctx = CacheContext(
                positions=ids,
                query_start_loc=torch.arange(batch + 1, device=device),
                seq_lens=ids + 1,
                slot_mapping=ids + self.scratch_block * self.block_size,
                block_tables=torch.full((batch, max(2, max_width)), self.scratch_block,
                                        dtype=torch.int64, device=device),
                block_size=self.block_size,
                host_query_lens=(1,) * batch,
                host_seq_lens=(1,) * batch,
            )
            with torch.inference_mode():  # as ModelRunner.execute calls run
                self.run(ids, ctx)


def is_compilable(model: torch.nn.Module) -> bool:
    """Whether the compiled decode path supports this model (Llama-style decoders)."""
    return isinstance(model, LlamaModel)

