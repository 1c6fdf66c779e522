"""The prefix-cache summary a replica reports to the prefix-aware router, and hash agreement.

The router hashes a prompt with prompt_block_hashes; the engine's block manager hashes the same
blocks as it caches them. These tests run real engines (in process and in a child process) and
check that both sides produce the same hashes and that a match predicts the cache hit.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from fastserve_ray.engine import BlockManager, LLMEngine, SamplingParams
from fastserve_ray.engine.prefix_summary import (
    MAX_REPORTED_HASHES,
    decode_summary,
    encode_summary,
    hash_block,
    matched_blocks,
    prompt_block_hashes,
    short_hash,
)
from fastserve_ray.engine.process_async_engine import ProcessLLMEngine
from fastserve_ray.engine.sequence import Sequence

BS = 4
PROMPT = list(range(3, 3 + 4 * BS + 2))  # 4 full blocks + 2 tokens


def test_the_block_manager_uses_the_summary_hash():
    from fastserve_ray.engine import block_manager

    assert block_manager.hash_block is hash_block


def test_prompt_chain_equals_what_the_block_manager_caches():
    bm = BlockManager(num_blocks=16, block_size=BS)
    seq = Sequence(PROMPT, seq_id=0)
    bm.allocate(seq, len(PROMPT))
    seq.num_computed_tokens = len(PROMPT)
    bm.cache_computed_blocks(seq)
    assert seq.block_hashes == prompt_block_hashes(PROMPT, BS)
    assert set(bm.cached_block_hashes(100)) == set(seq.block_hashes)


def test_the_chain_stops_before_the_block_holding_the_last_token():
    # A prompt of exactly 2 blocks: a hit may cover only the first (the engine computes >= 1 token).
    assert len(prompt_block_hashes(list(range(2 * BS)), BS)) == 1
    assert len(prompt_block_hashes(list(range(2 * BS + 1)), BS)) == 2
    assert prompt_block_hashes([1], BS) == []


def test_the_hash_does_not_depend_on_pythonhashseed():
    code = ("from fastserve_ray.engine.prefix_summary import prompt_block_hashes; "
            f"print(prompt_block_hashes({PROMPT!r}, {BS}))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed)).stdout for seed in ("0", "12345")}
    assert outs == {f"{prompt_block_hashes(PROMPT, BS)}\n"}


def test_summary_round_trip_and_leading_match():
    chain = prompt_block_hashes(PROMPT, BS)
    summary = encode_summary(BS, chain[:2] + chain[3:], num_cached_blocks=4)
    assert isinstance(summary["hashes"], bytes) and len(summary["hashes"]) == 4 * 3
    block_size, cached = decode_summary(summary)
    assert block_size == BS and cached == {short_hash(h) for h in chain} - {short_hash(chain[2])}
    assert matched_blocks(chain, cached) == 2  # leading only: block 3 is useless without block 2
    assert decode_summary({}) is None and decode_summary({"v": 99}) is None


def test_held_blocks_are_reported_before_evictable_ones_and_the_list_is_bounded():
    bm = BlockManager(num_blocks=8, block_size=BS)
    done, held = Sequence([5] * (2 * BS + 1), seq_id=0), Sequence([7] * (2 * BS + 1), seq_id=1)
    for seq in (done, held):
        bm.allocate(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        bm.cache_computed_blocks(seq)
    held_hashes = list(held.block_hashes)
    bm.free(done)  # its two hashed blocks become evictable
    assert bm.cached_block_hashes(2) == held_hashes
    assert len(bm.cached_block_hashes(3)) == 3 and bm.num_cached_blocks == 4
    assert BlockManager(4, BS, enable_prefix_caching=False).cached_block_hashes(10) == []


def test_engine_summary_predicts_the_prefix_hit(tiny_model_dir):
    engine = LLMEngine.from_model_dir(tiny_model_dir, block_size=BS, max_num_seqs=2)
    shared = list(range(10, 10 + 6 * BS))
    engine.generate([shared + [3, 4]], SamplingParams(max_tokens=2, temperature=0))
    block_size, cached = decode_summary(engine.prefix_cache_summary())
    assert block_size == BS
    second = shared + [5, 6, 7]
    matched = matched_blocks(prompt_block_hashes(second, BS), cached)
    assert matched == 6
    out = engine.generate([second], SamplingParams(max_tokens=2, temperature=0))[0]
    assert out.metrics.num_cached_tokens == matched * BS
    assert len(engine.prefix_cache_summary(max_hashes=3)["hashes"]) == 3 * 4
    assert MAX_REPORTED_HASHES * 4 <= 32 * 1024  # a report stays small


def test_the_summary_crosses_the_engine_process_pipe(tiny_model_dir):
    engine = ProcessLLMEngine(tiny_model_dir, {"block_size": BS, "max_num_seqs": 2}, num_threads=1)
    try:
        prompt = list(range(20, 20 + 3 * BS + 1))

        async def main():
            async for _ in engine.generate(prompt, SamplingParams(max_tokens=2, temperature=0)):
                pass
            return await engine.prefix_cache_summary()

        block_size, cached = decode_summary(asyncio.run(main()))
        assert block_size == BS
        assert matched_blocks(prompt_block_hashes(prompt, BS), cached) == 3
    finally:
        engine.shutdown()
    with pytest.raises(Exception, match="not running"):
        asyncio.run(engine.prefix_cache_summary())
