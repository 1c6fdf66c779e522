"""Recurrent language models (RNN, LSTM, GRU) with the decoder's interface.

Same contract as the Llama decoder: ``forward(tokens)`` for training and
``forward_cached(input_ids, ctx, cache)`` for incremental decoding. Their cache
is a pool of fixed-size state slots (one per sequence, ``ctx.state_slots``)
instead of a growing K/V history: memory per sequence does not grow with length.
"""

from __future__ import annotations

import torch
from torch import nn

from fastserve_ray.config import ModelConfig
from fastserve_ray.models.base import CachedLM
from fastserve_ray.models.cache import CacheContext

_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RecurrentLM(CachedLM):
    """Embedding -> stacked RNN/LSTM/GRU -> linear head; tokens (B, T) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rnn = _CELLS[cfg.arch](cfg.dim, cfg.dim, num_layers=cfg.n_layers, batch_first=True)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    @property
    def num_state_tensors(self) -> int:
        return 2 if self.config.arch == "lstm" else 1  # LSTM carries (h, c)

    def reset_parameters(self) -> None:
        """Embeddings N(0, std); recurrent weights U(-1/sqrt(dim), 1/sqrt(dim)) as torch does."""
        nn.init.normal_(self.embed_tokens.weight, 0.0, self.config.init_std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, self.config.init_std)
        self.rnn.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(tokens))

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The top RNN layer's output at every position: (B, T, C), what the head reads."""
        out, _ = self.rnn(self.embed_tokens(tokens))  # (B, T, C)
        return out

    def _pack_state(self, state: torch.Tensor):
        # pool layout (S, n_state, layers, C) -> torch's (layers, S, C) [or (h, c) for LSTM]
        state = state.permute(1, 2, 0, 3).contiguous()  # (n_state, layers, S, C)
        return (state[0], state[1]) if self.num_state_tensors == 2 else state[0]

    def _unpack_state(self, state) -> torch.Tensor:
        parts = state if isinstance(state, tuple) else (state,)
        return torch.stack(parts).permute(2, 0, 1, 3)  # (S, n_state, layers, C)

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        ctx: CacheContext,
        cache: torch.Tensor,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for new tokens (N,), reading and updating each sequence's state slot."""
        if ctx.state_slots is None:
            raise ValueError("recurrent models need ctx.state_slots (one state slot per sequence)")
        slots = ctx.state_slots
        state = cache[slots].to(self.embed_tokens.weight.dtype)  # (S, n_state, layers, C)
        starts = ctx.query_start_loc.tolist()
        # A chunk starting at position 0 begins a (re)computed sequence: its slot may be stale.
        fresh = ctx.positions[ctx.query_start_loc[:-1].clamp(max=len(input_ids) - 1)] == 0
        state = torch.where(fresh[:, None, None, None], torch.zeros_like(state), state)
        x = self.embed_tokens(input_ids)  # (N, C)
        q_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
        if len(set(q_lens)) == 1:  # decode steps (all length 1) run as one batch
            out, new_state = self.rnn(x.view(len(q_lens), q_lens[0], -1), self._pack_state(state))
            out = out.reshape(len(input_ids), -1)
            new_state = self._unpack_state(new_state)
        else:
            outs, states = [], []
            for s, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
                o, st = self.rnn(x[a:b][None], self._pack_state(state[s : s + 1]))
                outs.append(o[0])
                states.append(self._unpack_state(st))
            out, new_state = torch.cat(outs), torch.cat(states)
        cache.index_copy_(0, slots, new_state.to(cache.dtype))
        if logits_indices is not None:
            out = out[logits_indices]
        return self.lm_head(out)

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of the state pool: one slot per 'block'; block_size plays no part."""
        return (num_blocks, self.num_state_tensors, self.config.n_layers, self.config.dim)
