"""What every language model here shares: tied embeddings and a caller-owned cache pool."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastserve_ray.config import ModelConfig
from fastserve_ray.models.cache import CacheContext


class CachedLM(nn.Module):
    """Base of the decoder and the recurrent LMs; subclasses define ``cache_shape``."""

    config: ModelConfig
    embed_tokens: nn.Embedding
    lm_head: nn.Linear

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def post_materialize(self) -> None:
        """Restore what ``to_empty`` breaks (the weight tie; subclasses add computed buffers)."""
        self.tie_weights()

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) final hidden states, the head's input (embeddings)."""
        raise NotImplementedError

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        ctx: CacheContext,
        cache: torch.Tensor,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for the new tokens ``input_ids`` (N,), reading and writing ``cache`` as ``ctx`` says;
        only the rows in ``logits_indices`` when given. What the engine's runner calls."""
        raise NotImplementedError

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of the cache pool for ``num_blocks`` blocks (or state slots)."""
        raise NotImplementedError

    def allocate_cache(
        self, num_blocks: int, block_size: int, device: torch.device | str, dtype: torch.dtype
    ) -> torch.Tensor:
        """Zeroed cache storage for ``num_blocks`` blocks (K/V blocks, or recurrent state slots)."""
        return torch.zeros(self.cache_shape(num_blocks, block_size), device=device, dtype=dtype)

    def cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block (or state slot) takes across all layers."""
        return math.prod(self.cache_shape(1, block_size)) * dtype.itemsize
