"""Real-model factories for engine tests: tiny random models, the uncached reference, a scripted LM.

The reference for greedy decoding is the slowest correct thing: a full, uncached forward over
the whole sequence for every token. ``ScriptedLM`` emits a fixed token script whatever the
input, so text, stop-string and streaming tests can name the exact text they expect.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from fastserve_ray.engine import EngineConfig, LLMEngine
from fastserve_ray.models import build_model, get_preset
from fastserve_ray.models.cache import CacheContext


@functools.cache
def tiny_model(preset: str = "tiny", seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised tiny model in eval mode (cached: tests must not modify it)."""
    torch.manual_seed(seed)
    # A larger init spreads the logits, so greedy picks are far from ties and the outputs vary.
    return build_model(get_preset(preset, init_std=0.2, **overrides)).eval()


@torch.no_grad()
def reference_greedy(model: nn.Module, prompt: Sequence[int], num_tokens: int) -> list[int]:
    """Greedy tokens from a full uncached forward over the whole sequence per token."""
    tokens = list(prompt)
    device = next(model.parameters()).device
    for _ in range(num_tokens):
        logits = model(torch.tensor([tokens], device=device))[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


@torch.no_grad()
def reference_logprobs(model: nn.Module, tokens: Sequence[int]) -> torch.Tensor:
    """log-softmax of the full forward's last position for ``tokens``: (vocab,)."""
    device = next(model.parameters()).device
    return model(torch.tensor([list(tokens)], device=device))[0, -1].float().log_softmax(-1)


def make_engine(model: nn.Module, tokenizer=None, **config) -> LLMEngine:
    """An LLMEngine over ``model`` with test-sized defaults (overridable)."""
    defaults = dict(block_size=8, max_num_seqs=8, max_num_batched_tokens=64, num_blocks=128,
                    seed=0)
    return LLMEngine(model, tokenizer, EngineConfig(**{**defaults, **config}))


class ScriptedLM(nn.Module):
    """Emits ``script[i]`` as output token i of a prompt of ``prompt_len`` tokens, then ``tail``."""

    def __init__(self, config, script: Sequence[int], prompt_len: int, tail: int) -> None:
        super().__init__()
        self.config = config
        self.script = list(script)
        self.prompt_len = prompt_len
        self.tail = tail
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the runner a device and dtype

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        ctx: CacheContext,
        cache: torch.Tensor,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        positions = ctx.positions if logits_indices is None else ctx.positions[logits_indices]
        logits = torch.zeros(len(positions), self.config.vocab_size)
        for row, pos in enumerate(positions.tolist()):
            i = pos + 1 - self.prompt_len  # index of the output token this row predicts
            logits[row, self.script[i] if 0 <= i < len(self.script) else self.tail] = 10.0
        return logits

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (1, 2, num_blocks * block_size, 1, 1)  # the Llama layout, one scalar per slot

    def allocate_cache(self, num_blocks, block_size, device, dtype) -> torch.Tensor:
        return torch.zeros(self.cache_shape(num_blocks, block_size), device=device, dtype=dtype)

    def cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return math.prod(self.cache_shape(1, block_size)) * dtype.itemsize


def scripted_engine(tokenizer, text: str, prompt: str = "x", **config) -> tuple[LLMEngine, str]:
    """An engine whose model writes ``text`` (then EOS forever) after the text ``prompt``."""
    prompt_len = len(tokenizer.encode(prompt, add_bos=True))
    cfg = get_preset("tiny", vocab_size=tokenizer.vocab_size)
    model = ScriptedLM(cfg, tokenizer.encode(text), prompt_len, tail=tokenizer.eos_id)
    return make_engine(model, tokenizer, **config), prompt
