"""Single-prompt generation straight on a model (no engine): sampling and a cached decode loop.

The inference engine (engine/) batches many requests; this module is the
simple path for one prompt and the reference the engine is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fastserve_ray.errors import ConfigError
from fastserve_ray.models.cache import build_cache_context


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (R, V) logits outside each row's top-k (0 = off) and top-p nucleus with -inf."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it
    # already does. The first token is never dropped (the mass before it is 0); top_p == 1
    # drops nothing, even where float rounding lets the running mass reach 1 early.
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from a (vocab,) row of logits; temperature 0 is greedy."""
    if temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0 or top_p < 1.0:
        k, p = torch.tensor([top_k]), torch.tensor([float(top_p)])
        logits = apply_top_k_top_p(logits[None], k.to(logits.device), p.to(logits.device))[0]
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> list[int]:
    """New token ids after ``prompt_ids``, decoded incrementally with a contiguous cache."""
    cfg = model.config
    if not prompt_ids:
        raise ConfigError("prompt is empty: give at least one token")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
        raise ConfigError(f"temperature must be in [0, 2], got {temperature}")
    bad = [t for t in prompt_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    total = len(prompt_ids) + max_tokens
    if total > cfg.max_seq_len:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
            f"model's max_seq_len {cfg.max_seq_len}"
        )
    param = next(model.parameters())
    device = param.device
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    # One block holding the whole sequence: the paged layout degenerates to a contiguous cache.
    cache = model.allocate_cache(1, total, device, param.dtype)
    out: list[int] = []
    tokens, num_cached = list(prompt_ids), 0
    while len(out) < max_tokens:
        new = tokens[num_cached:]
        ctx = build_cache_context([num_cached], [len(new)], [[0]], total, device, state_slots=[0])
        ids = torch.tensor(new, dtype=torch.int64, device=device)
        last = torch.tensor([len(new) - 1], device=device)
        logits = model.forward_cached(ids, ctx, cache, logits_indices=last)[0]
        num_cached += len(new)
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out.append(token)
        tokens.append(token)
        if token in stop_ids:
            break
    return out


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_tokens: int = 32,
    temperature: float = 0.0,
    seed: int | None = None,
) -> str:
    """Generated text for ``prompt``, stopping at the tokenizer's eos token."""
    prompt_ids = tokenizer.encode(prompt, add_bos=True)
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids = generate_tokens(model, prompt_ids, max_tokens, temperature, seed=seed, stop_ids=stop)
    if ids and ids[-1] in stop:
        ids = ids[:-1]
    return tokenizer.decode(ids)
