"""Paged attention as one flex_attention call over the pool (engine.attention_backend: flex).

On CPU flex_attention runs eagerly, so these check the mask logic (which slots each row may
read), not speed: every case compares against the default paths on the same step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_paged_attention import _step

from fastserve_ray import envs
from fastserve_ray.capability import refresh as refresh_capability
from fastserve_ray.engine import LLMEngine, SamplingParams
from fastserve_ray.errors import ConfigError
from fastserve_ray.layers.attention import build_attention_metadata, paged_attention
from fastserve_ray.models import build_model, get_preset

# Eager flex_attention on CPU is the intended test path here; its advice to compile is not news.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@torch.no_grad()
def _full_forward_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("n_heads,n_kv,head_dim,block_size", [(8, 8, 64, 16), (4, 2, 16, 8)])
def test_a_mixed_step_equals_the_default_paths(monkeypatch, n_heads, n_kv, head_dim, block_size):
    # Decodes, a chunk after a cached prefix, a fresh prompt, blocks shuffled in the pool.
    num_cached = [5, 0, 2 * block_size + 3, 1, 40]
    num_new = [1, 7, 9, 1, 1]
    q, k, v, kv, ctx = _step(num_cached, num_new, n_heads, n_kv, head_dim, block_size, torch.float32)
    ref = paged_attention(q, k, v, kv, build_attention_metadata(ctx, num_slots=kv.shape[1]))
    meta = build_attention_metadata(dataclasses.replace(ctx, attention="flex"), num_slots=kv.shape[1])
    assert meta.flex is not None and not meta.spans and meta.decode is None
    out = paged_attention(q, k, v, kv, meta)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_free_slots_and_other_sequences_slots_are_never_read(monkeypatch):
    # Poison every slot that no sequence of the step owns: a leak through the mask (a free slot,
    # the 0-padding of a block table) would show as a huge output. Causality within a sequence
    # is checked against the default paths above.
    q, k, v, kv, ctx = _step([3, 17], [1, 4], 4, 2, 16, 8, torch.float32, seed=3)
    readable = set()
    for s, seq_len in enumerate(ctx.host_seq_lens):
        for pos in range(seq_len):
            readable.add(int(ctx.block_tables[s, pos // 8]) * 8 + pos % 8)
    poisoned = kv.clone()
    for slot in range(kv.shape[1]):
        if slot not in readable:
            poisoned[:, slot] = 1e6
    meta = build_attention_metadata(dataclasses.replace(ctx, attention="flex"), num_slots=kv.shape[1])
    torch.testing.assert_close(paged_attention(q, k, v, poisoned, meta), paged_attention(q, k, v, kv, meta))


def test_engine_greedy_tokens_equal_the_full_forward_under_flex(monkeypatch, tiny_tokenizer):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    prompts = [[(7 * i + 13 * j) % 400 + 3 for j in range(n)] for i, n in enumerate([3, 40, 17, 61])]
    want = [_full_forward_greedy(model, p, 12) for p in prompts]
    engine = LLMEngine(model, tiny_tokenizer, max_num_batched_tokens=32, num_blocks=20,
                       attention_backend="flex")
    assert engine.plan.attention == "flex" and engine.plan.decode_attention == "flex"
    outs = engine.generate(prompts, [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)] * 4)
    assert [o.token_ids for o in outs] == want
    assert engine.block_manager.num_free_blocks == 20


def test_the_environment_overrides_the_config_and_a_bad_name_is_an_error(monkeypatch, tiny_tokenizer):
    model = build_model(get_preset("tiny")).eval()
    try:
        monkeypatch.setenv(envs.ATTENTION, "flash")
        with pytest.raises(ConfigError, match="FASTSERVE_ATTENTION='flash'"):
            refresh_capability()
        with pytest.raises(ConfigError, match="engine.attention_backend must be one of"):
            LLMEngine(model, tiny_tokenizer, num_blocks=8, attention_backend="flash")
        monkeypatch.setenv(envs.ATTENTION, "flex")
        refresh_capability()
        assert LLMEngine(model, tiny_tokenizer, num_blocks=8).plan.attention == "flex"
        monkeypatch.setenv(envs.ATTENTION, "")
        refresh_capability()
        assert LLMEngine(model, tiny_tokenizer, num_blocks=8).plan.attention == "paged"
    finally:
        monkeypatch.undo()
        refresh_capability()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_compiled_flex_equals_the_per_sequence_path(monkeypatch, dtype, tol):
    q, k, v, kv, ctx = _step([5, 0, 35, 1, 40], [1, 7, 9, 1, 1], 8, 2, 64, 16, dtype)
    q, k, v, kv = (t.cuda() for t in (q, k, v, kv))
    ctx = dataclasses.replace(ctx, **{f: getattr(ctx, f).cuda() for f in (
        "positions", "query_start_loc", "seq_lens", "slot_mapping", "block_tables")})
    ref = paged_attention(q, k, v, kv, build_attention_metadata(ctx, num_slots=kv.shape[1]))
    flex_ctx = dataclasses.replace(ctx, attention="flex")
    out = paged_attention(q, k, v, kv, build_attention_metadata(flex_ctx, num_slots=kv.shape[1]))
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
