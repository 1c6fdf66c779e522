"""The engine on CUDA: pinned host swaps, per-request CUDA generators, bf16, the async loop."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from model_helpers import make_engine, reference_greedy, tiny_model

from fastserve_ray.engine import AsyncLLMEngine, LLMEngine, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[(7 * i + 13 * j) % 512 for j in range(n)] for i, n in enumerate([3, 40, 17, 61, 9, 25])]
LENGTHS = [20, 8, 14, 5, 25, 11]


def cuda_model(preset: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return copy.deepcopy(tiny_model(preset)).to("cuda", dtype)


@pytest.mark.parametrize(("preset", "num_blocks"), [("tiny", 12), ("gru-tiny", 2)])
def test_cuda_greedy_under_swap_pressure_matches_the_reference(preset, num_blocks):
    model = cuda_model(preset)
    engine = make_engine(model, policy="mlfq", num_blocks=num_blocks, num_host_blocks=40,
                         max_num_batched_tokens=16)
    assert engine.runner.cache.is_cuda and engine.runner.host_cache.is_pinned()
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in LENGTHS]
    outs = engine.generate(PROMPTS, params)
    for prompt, n, out in zip(PROMPTS, LENGTHS, outs):
        assert out.token_ids == reference_greedy(model, prompt, n)
    assert engine.stats.num_swapped_out > 0
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_host_blocks == bm.num_host_blocks


def test_cuda_bf16_greedy_tokens_are_argmax_of_the_full_forward():
    model = cuda_model("tiny", torch.bfloat16)
    engine = make_engine(model, num_blocks=14, preemption_mode="recompute",
                         max_num_batched_tokens=16)
    outs = engine.generate(PROMPTS, [SamplingParams(max_tokens=n, temperature=0) for n in LENGTHS])
    for prompt, out in zip(PROMPTS, outs):
        # Teacher-forced: bf16 rounding may flip a near-tie, nothing more.
        seq = torch.tensor([prompt + out.token_ids[:-1]], device="cuda")
        with torch.no_grad():
            full = model(seq)[0, len(prompt) - 1 :].float()
        for i, token in enumerate(out.token_ids):
            assert (full[i].max() - full[i, token]).item() <= 0.05


def test_cuda_seeded_sampling_does_not_depend_on_the_batch():
    model = cuda_model("tiny")
    me = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    alone = make_engine(model).generate([PROMPTS[2]], me)[0].token_ids
    crowd = [SamplingParams(max_tokens=n, temperature=0.8, seed=i) for i, n in enumerate(LENGTHS)]
    crowd[2] = me
    outs = make_engine(model, num_blocks=14, max_num_batched_tokens=16).generate(PROMPTS, crowd)
    assert outs[2].token_ids == alone


def test_cuda_async_stream_and_cancel():
    engine = make_engine(cuda_model("tiny"), num_blocks=40)

    async def body() -> None:
        aengine = AsyncLLMEngine(engine)
        try:
            outs = [o async for o in aengine.generate(PROMPTS[0], SamplingParams(max_tokens=6))]
            assert outs[-1].finished and len(outs[-1].token_ids) == 6
            stream = aengine.generate(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True))
            await stream.__anext__()
            await stream.aclose()
            assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        finally:
            aengine.shutdown()

    asyncio.run(body())


def test_from_model_dir_defaults_to_cuda_bf16(tiny_model_dir):
    engine = LLMEngine.from_model_dir(tiny_model_dir, max_num_seqs=2)
    assert engine.device.type == "cuda" and engine.runner.cache.dtype == torch.bfloat16
    out = engine.generate("The for", SamplingParams(max_tokens=8))[0]
    assert len(out.token_ids) <= 8 and out.finish_reason in ("stop", "length")
