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

import torch
import torch.nn.functional as F
from torch import nn

from fastserve_ray.config import ModelConfig
from fastserve_ray.kernels import norm_rope
from fastserve_ray.kernels.decode_layer import decode_layer_kernel
from fastserve_ray.layers.attention import AttentionMetadata, build_attention_metadata, paged_attention
from fastserve_ray.layers.int8_rows import int8_rows_of
from fastserve_ray.layers.norm import RMSNorm
from fastserve_ray.layers.rotary import RotaryEmbedding, apply_rope
from fastserve_ray.models.base import CachedLM
from fastserve_ray.models.cache import CacheContext


def _one_token_group(members: tuple[nn.Module, ...]) -> tuple[list, list, list] | None:
    """(weights, scales, biases) of projections that share an input, for the one-call decode
    layer: all contiguous bf16 weights (no scales), or all int8 rows with their scales; biases
    contiguous bf16 or None (Qwen2's q/k/v); None otherwise."""
    weights = [getattr(p, "weight", None) for p in members]
    biases = [getattr(p, "bias", None) for p in members]
    if not all(b is None or (b.dtype == torch.bfloat16 and b.is_contiguous()) for b in biases):
        return None
    if all(isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.is_contiguous() for w in weights):
        return weights, [], biases
    rows = [int8_rows_of(p) for p in members]
    if all(r is not None for r in rows):
        return [r[0] for r in rows], [r[1] for r in rows], biases
    return None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # Optional: one module computing q|k|v at once from the three projections' parameters
        # (a layers.fused.FusedLinear the engine installs on CPU). Owns no parameters.
        self.fused_qkv: nn.Module | None = None

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (..., H|Hkv, D) before RoPE (views of one product where q|k|v are fused)."""
        shape = x.shape[:-1]
        if self.fused_qkv is not None:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.fused_qkv(x).split((self.n_heads * self.head_dim, kv_width, kv_width), -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(*shape, self.n_heads, self.head_dim)
        k = k.view(*shape, self.n_kv_heads, self.head_dim)
        v = v.view(*shape, self.n_kv_heads, self.head_dim)
        return q, k, v

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q, k, v = self._project(x)
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
        slot_mapping: torch.Tensor,  # (N,) cache slot of each new token
        kv: torch.Tensor,  # (2, num_slots, Hkv, D) this layer's pool
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self._project(x)  # (N, H|Hkv, D), RoPE not yet applied
        q_rotated = norm_rope.rope_write_cache(q, k, v, cos, sin, kv, slot_mapping) if meta.native else None
        if q_rotated is not None:  # one native call did RoPE and the cache write
            q = q_rotated
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kv[0].index_copy_(0, slot_mapping, k.to(kv.dtype))
            kv[1].index_copy_(0, slot_mapping, v.to(kv.dtype))
        y = paged_attention(q, k, v, kv, meta)  # (N, H, D)
        return self.o_proj(y.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.fused_gate_up: nn.Module | None = None  # optional gate|up in one call, as fused_qkv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


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

    def fusable_linears(self) -> list[tuple[nn.Module, str, list[nn.Module]]]:
        """Projections of one input that may run as one product: (owner, attribute, members)."""
        groups: list[tuple[nn.Module, str, list[nn.Module]]] = []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            groups.append((a, "fused_qkv", [a.q_proj, a.k_proj, a.v_proj]))
            groups.append((m, "fused_gate_up", [m.gate_proj, m.up_proj]))
        return groups

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(tokens))  # (B, T, V)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final (normed) hidden state of every position: (B, T, C), what the head reads."""
        B, T = tokens.shape
        x = self.embed_tokens(tokens)  # (B, T, C)
        cos, sin = self.rotary(torch.arange(T, device=tokens.device), x.dtype)  # (T, D)
        for layer in self.layers:
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

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
        meta = build_attention_metadata(ctx, num_slots=cache[0].shape[1])  # a tensor or per-layer list
        # The residual adds ride along with the norms that follow them (add_and_norm): the
        # stream x is updated in place, as the embedding gave this call a tensor of its own.
        delta = None
        one_token = self._one_token_layers(x, cache, meta)
        kernel = decode_layer_kernel() if one_token is not None else None
        for i, layer in enumerate(self.layers):
            if one_token is not None:  # a batch-1 decode: each layer in one native call
                delta = self._decode_one_token(kernel, one_token[i], i, x, delta, cos, sin, ctx, cache[i],
                                               meta)
                continue
            x, h = layer.input_layernorm.add_and_norm(x, delta, meta.native)
            delta = layer.self_attn.forward_cached(h, cos, sin, ctx.slot_mapping, cache[i], meta)
            x, h = layer.post_attention_layernorm.add_and_norm(x, delta, meta.native)
            delta = layer.mlp(h)
        if logits_indices is not None:
            x, delta = x.index_select(0, logits_indices), delta.index_select(0, logits_indices)
        return self.lm_head(self.norm.add_and_norm(x, delta, meta.native)[1])

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self._one_token_weights = None  # rebuilt from the (possibly converted) parameters
        return super()._apply(fn, recurse)

    def _one_token_layers(self, x: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata):
        """Each layer's weights for the one-call batch-1 decode, or None where it does not apply:
        not one bf16 CPU decode row, autograd on, ``torch.compile`` tracing, no native kernel, or
        a layer whose projections are not plain bf16 weights (compressed layers, other dtypes)."""
        if (x.shape[0] != 1 or x.dtype != torch.bfloat16 or x.device.type != "cpu" or not meta.native
                or cache.dtype != torch.bfloat16 or meta.decode is None or meta.spans
                or torch.is_grad_enabled() or torch.compiler.is_compiling()):
            return None
        if decode_layer_kernel() is None:
            return None
        weights = getattr(self, "_one_token_weights", None)
        if weights is None:
            weights = self._one_token_weights = self._collect_one_token_weights()
        return weights or None

    def _collect_one_token_weights(self) -> list[tuple]:
        """Per layer, the arguments of the one-call decode layer: norms, then for each projection
        group (q|k|v, o, gate|up, down) its weights, their scales (empty for bf16) and biases. An
        empty list where any group is neither all contiguous bf16 weights nor all int8 rows
        (``int8_rows()`` of a compressed layer), or where the MLP has biases: the layer-by-layer
        path runs there. Parameters are held, not their data, so in-place loads stay visible."""
        out = []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            groups = []
            for members in ((a.q_proj, a.k_proj, a.v_proj), (a.o_proj,), (m.gate_proj, m.up_proj),
                            (m.down_proj,)):
                group = _one_token_group(members)
                if group is None:
                    return []
                groups.append(group)
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            mlp_biases = [b for _, _, biases in groups[2:] for b in biases if b is not None]
            if any(n.dtype != torch.bfloat16 for n in norms) or mlp_biases:
                return []
            out.append((norms, *groups))
        return out

    def _decode_one_token(self, kernel, weights: tuple, i: int, x: torch.Tensor,  # noqa: ANN001
                          delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                          ctx: CacheContext, kv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        norms, (qkv, qkv_s, qkv_b), (o, o_s, o_b), (gu, gu_s, _), (down, down_s, _) = weights
        a = self.layers[i].self_attn
        d = meta.decode
        return kernel(
            x, delta, norms, self.config.norm_eps, qkv, qkv_s, qkv_b, o, o_s, o_b, gu, gu_s, down, down_s,
            a.n_heads, a.n_kv_heads, a.head_dim, cos, sin, kv[0], kv[1], ctx.slot_mapping,
            d.block_tables, d.seq_lens, d.rows, meta.block_size, 1.0 / math.sqrt(a.head_dim))

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of the paged K/V pool: (layers, k|v, slots, kv heads, head dim)."""
        c = self.config
        return (c.n_layers, 2, num_blocks * block_size, c.n_kv_heads, c.head_dim)
