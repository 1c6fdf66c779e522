"""Prompt logprobs: every prompt token scored as a plain forward scores it, whatever the schedule."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fastserve_ray.engine import LLMEngine, RequestError, SamplingParams
from fastserve_ray.engine.process_async_engine import ProcessLLMEngine
from fastserve_ray.models import build_model, get_preset

PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(get_preset("tiny")).eval()


def _reference(model, prompt: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    return [logits[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]


@pytest.mark.parametrize("chunk", [16, 256])
def test_prompt_logprobs_match_a_plain_forward_with_and_without_chunked_prefill(model, chunk: int) -> None:
    engine = LLMEngine(model, None, num_blocks=64, max_num_batched_tokens=chunk, dtype="float32")
    out = engine.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    lps = out.prompt_logprobs
    assert len(lps) == len(PROMPT) and lps[0] is None
    for lp, ref, tok in zip(lps[1:], _reference(model, PROMPT), PROMPT[1:]):
        assert lp.token_id == tok and abs(lp.logprob - ref) < 1e-4 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0][1] >= lp.logprob - 1e-6
    # The prefix cache now holds the prompt; a second request still computes (and scores) it all.
    again = engine.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert again.metrics.num_cached_tokens == 0
    assert [lp.logprob for lp in again.prompt_logprobs[1:]] == pytest.approx(
        [lp.logprob for lp in lps[1:]], abs=1e-5
    )
    plain = engine.generate([PROMPT], SamplingParams(max_tokens=1))[0]
    assert plain.metrics.num_cached_tokens > 0 and plain.prompt_logprobs is None


def test_preemption_keeps_the_prompt_logprobs(model) -> None:
    # 6 sequences in a cache that holds ~2 of them: preempted and recomputed, never re-scored.
    engine = LLMEngine(
        model, None, num_blocks=12, block_size=8, max_num_seqs=6, dtype="float32", preemption_mode="recompute"
    )
    prompts = [[(7 * k + i) % 400 + 3 for i in range(30)] for k in range(6)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True, prompt_logprobs=0))
    assert engine.stats.num_preempted > 0
    for prompt, out in zip(prompts, outs):
        assert len(out.prompt_logprobs) == len(prompt)
        got = [lp.logprob for lp in out.prompt_logprobs[1:]]
        assert got == pytest.approx(_reference(model, prompt), abs=1e-4)


def test_bad_prompt_logprobs_are_request_errors() -> None:
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(RequestError) as e:
            SamplingParams(prompt_logprobs=bad)
        assert e.value.param == "prompt_logprobs"


def test_the_engine_process_carries_them(tiny_model_dir: Path) -> None:
    engine = ProcessLLMEngine(str(tiny_model_dir), {"max_num_seqs": 2})

    async def run() -> list:
        outs = []
        async for out in engine.generate(
            PROMPT[:20], SamplingParams(max_tokens=3, prompt_logprobs=1, ignore_eos=True)
        ):
            outs.append(out)
        return outs

    try:
        outs = asyncio.run(run())
    finally:
        engine.shutdown()
    assert len(outs[0].prompt_logprobs) == 20 and outs[0].prompt_logprobs[0] is None
    assert outs[-1].prompt_logprobs == outs[0].prompt_logprobs  # the first and the final output
    assert all(o.prompt_logprobs is None for o in outs[1:-1])
