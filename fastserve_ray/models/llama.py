"""Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Parameter names follow Hugging Face's LlamaForCausalLM (without the ``model.``
prefix) so that importing and exporting checkpoints is a rename, not a rewrite.
Two forward modes:
  * ``forward(tokens)``: full sequences with a causal mask (training, evaluation);
  * ``forward_cached(input_ids, ctx, cache)``: new tokens only, attending to K/V
    that the caller keeps in a paged cache (see cache.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastserve_ray.config import ModelConfig
from fastserve_ray.models.base import CachedLM
from fastserve_ray.models.cache import CacheContext


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 squares underflow), scale in the input dtype, as HF does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed from positions on the fly: any position, no table to outgrow."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        return 1.0 / (self.theta**exponents)

    def reset_buffers(self) -> None:
        """Recompute the frequency table (after a model was materialised from 'meta')."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # (..., head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., T, H, D) by cos/sin (..., T, D) — HF's half-split convention."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(*shape, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*shape, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        # (B, Hkv, L, D) -> (B, H, L, D): each kv head serves n_heads/n_kv_heads query heads.
        groups = self.n_heads // self.n_kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)  # (B, T, H|Hkv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, self._expand_kv(k), self._expand_kv(v), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward_cached(
        self,
        x: torch.Tensor,  # (N, C) new tokens of all sequences, flattened
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: CacheContext,
        kv: torch.Tensor,  # (2, num_slots, Hkv, D) this layer's pool
        groups: list[AttentionGroup],
    ) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin)  # (N, H|Hkv, D)
        kv[0].index_copy_(0, ctx.slot_mapping, k.to(kv.dtype))
        kv[1].index_copy_(0, ctx.slot_mapping, v.to(kv.dtype))
        # Whole blocks are gathered (contiguous copies), not single slots.
        k_blocks = kv[0].view(-1, ctx.block_size, self.n_kv_heads, self.head_dim)
        v_blocks = kv[1].view(-1, ctx.block_size, self.n_kv_heads, self.head_dim)
        y = torch.empty_like(q)
        for g in groups:
            keys = k_blocks[g.block_ids].flatten(1, 2).transpose(1, 2).to(q.dtype)  # (S, Hkv, L, D)
            values = v_blocks[g.block_ids].flatten(1, 2).transpose(1, 2).to(q.dtype)
            qp = q[g.q_rows].transpose(1, 2)  # (S, H, Q, D); padded rows are copies, dropped below
            out = F.scaled_dot_product_attention(
                qp, self._expand_kv(keys), self._expand_kv(values), attn_mask=g.mask
            )
            y[g.token_rows] = out.transpose(1, 2)[g.q_valid]
        return self.o_proj(y.reshape(x.shape[0], -1))


@dataclass
class AttentionGroup:
    """Sequences attended together, padded to the group's own query and key lengths.

    Decodes (1 new token) and prefill chunks (many) go in separate groups: padded
    together, every decode would pay for the longest chunk's query length.
    """

    token_rows: torch.Tensor  # (n,) rows of the flat batch that belong to this group
    block_ids: torch.Tensor  # (S, num_blocks) physical blocks holding each sequence's keys
    q_rows: torch.Tensor  # (S, Q) flat row of each padded query slot
    q_valid: torch.Tensor  # (S, Q) which query slots are real
    mask: torch.Tensor  # (S, 1, Q, num_blocks * block_size) causal and length mask


def attention_groups(ctx: CacheContext) -> list[AttentionGroup]:
    """Index tensors shared by every layer, one set per group of similar query lengths."""
    q_lens = (ctx.query_start_loc[1:] - ctx.query_start_loc[:-1]).tolist()
    seq_lens = ctx.seq_lens.tolist()
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    prefill = [i for i, n in enumerate(q_lens) if n > 1]
    return [_group(ctx, idx, q_lens, seq_lens) for idx in (decode, prefill) if idx]


def _group(ctx: CacheContext, idx: list[int], q_lens: list[int], seq_lens: list[int]) -> AttentionGroup:
    device = ctx.positions.device
    Q = max(q_lens[i] for i in idx)
    num_blocks = min(-(-max(seq_lens[i] for i in idx) // ctx.block_size), ctx.block_tables.shape[1])
    L = num_blocks * ctx.block_size
    sel = torch.tensor(idx, device=device)
    starts = ctx.query_start_loc[:-1][sel]
    r = torch.arange(Q, device=device)
    q_valid = r[None, :] < torch.tensor([q_lens[i] for i in idx], device=device)[:, None]  # (S, Q)
    q_rows = (starts[:, None] + r[None, :]).clamp(max=max(ctx.positions.shape[0] - 1, 0))
    key_pos = torch.arange(L, device=device)
    q_pos = ctx.positions[q_rows]  # (S, Q)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # causal within the cached context
    mask &= key_pos[None, None, :] < ctx.seq_lens[sel][:, None, None]
    # Padded query slots would see no key at all (NaN softmax); let them see key 0, then drop them.
    mask[:, :, 0] |= ~q_valid
    return AttentionGroup(q_rows[q_valid], ctx.block_tables[sel, :num_blocks], q_rows, q_valid,
                          mask[:, None])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)


class LlamaModel(CachedLM):
    """Decoder-only transformer; tokens (B, T) -> logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.tie_weights()
        self.reset_parameters()

    def post_materialize(self) -> None:
        """Restore ties and computed buffers after ``to_empty`` (which breaks both)."""
        super().post_materialize()
        self.rotary.reset_buffers()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, std), residual output projections scaled by depth."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if "norm" in name else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # Keeps the residual stream's variance flat as layers add up.
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        x = self.embed_tokens(tokens)  # (B, T, C)
        cos, sin = self.rotary(torch.arange(T, device=tokens.device), x.dtype)  # (T, D)
        for layer in self.layers:
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x))  # (B, T, V)

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        ctx: CacheContext,
        cache: torch.Tensor,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for new tokens (N,) given the paged cache; only rows in logits_indices if given."""
        x = self.embed_tokens(input_ids)  # (N, C)
        cos, sin = self.rotary(ctx.positions, x.dtype)  # (N, D)
        groups = attention_groups(ctx)
        for i, layer in enumerate(self.layers):
            x = x + layer.self_attn.forward_cached(
                layer.input_layernorm(x), cos, sin, ctx, cache[i], groups
            )
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if logits_indices is not None:
            x = x[logits_indices]
        return self.lm_head(self.norm(x))

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of the paged K/V pool: (layers, k|v, slots, kv heads, head dim)."""
        c = self.config
        return (c.n_layers, 2, num_blocks * block_size, c.n_kv_heads, c.head_dim)
