"""Greedy continuous batching == each request alone with a full uncached forward per token.

One workload, staggered arrivals, mixed prompt and output lengths, three prompts sharing a
two-block prefix, and a token budget small enough to chunk every long prefill; run under both
schedulers, for a Llama decoder and a recurrent LM, with ample memory and with a block budget
so small that sequences are preempted (swapped to the host tier, or dropped and recomputed).
"""

from __future__ import annotations

import functools

import pytest
from model_helpers import make_engine, reference_greedy, tiny_model

from fastserve_ray.engine import SamplingParams

BLOCK_SIZE = 8
SHARED_PREFIX = [(11 * j + 5) % 512 for j in range(2 * BLOCK_SIZE)]  # two full blocks


def _prompt(n: int, salt: int) -> list[int]:
    return [(salt * 131 + 17 * j) % 512 for j in range(n)]


# (prompt, max_tokens, step at which it arrives)
WORKLOAD = [
    (_prompt(1, 1), 12, 0),
    (SHARED_PREFIX + _prompt(3, 2), 9, 0),
    (_prompt(40, 3), 8, 0),
    (_prompt(5, 4), 3, 1),
    (SHARED_PREFIX + _prompt(9, 5), 6, 4),
    (_prompt(61, 6), 4, 4),
    (SHARED_PREFIX + _prompt(20, 7), 14, 7),
    (_prompt(2, 8), 18, 9),
    (_prompt(30, 9), 10, 12),
    (_prompt(7, 10), 25, 12),
]

SCENARIOS = {
    # name: engine config overrides, and the counter that proves memory pressure happened
    "ample": (dict(num_blocks=128), None),
    "swap": (dict(num_blocks=11, num_host_blocks=48, preemption_mode="swap"), "num_swapped_out"),
    "recompute": (dict(num_blocks=11, num_host_blocks=0, preemption_mode="recompute"),
                  "num_preempted"),
}
RECURRENT_SLOTS = {"ample": 16, "swap": 2, "recompute": 2}  # state slots instead of blocks


@functools.cache
def _expected(preset: str) -> tuple[tuple[int, ...], ...]:
    model = tiny_model(preset)
    return tuple(tuple(reference_greedy(model, p, n)) for p, n, _ in WORKLOAD)


def _run(engine, params_for) -> dict[str, list[int]]:
    """Drive the engine step by step, adding requests at their arrival step."""
    ids: dict[int, str] = {}
    results: dict[str, list[int]] = {}
    step = 0
    while len(results) < len(WORKLOAD):
        for i, (prompt, n, arrival) in enumerate(WORKLOAD):
            if arrival == step:
                ids[i] = engine.add_request(prompt, params_for(n))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        step += 1
        assert step < 2000, "engine made no progress"
    return {i: results[rid] for i, rid in ids.items()}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("policy", ["fcfs", "mlfq"])
@pytest.mark.parametrize("preset", ["tiny", "gru-tiny"])
def test_batched_greedy_equals_uncached_reference(preset, policy, scenario):
    overrides, pressure_counter = SCENARIOS[scenario]
    if preset != "tiny":
        overrides = {**overrides, "num_blocks": RECURRENT_SLOTS[scenario]}
        overrides["num_host_blocks"] = min(overrides.get("num_host_blocks", 8), 8)
        if policy == "fcfs":
            # A state slot never grows, so FCFS never has to evict a running sequence: new
            # ones wait for a slot. Only MLFQ's priorities preempt recurrent sequences.
            pressure_counter = None
    engine = make_engine(
        tiny_model(preset), policy=policy, block_size=BLOCK_SIZE, max_num_seqs=6,
        max_num_batched_tokens=16, **overrides,
    )
    got = _run(engine, lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    expected = _expected(preset)
    for i in range(len(WORKLOAD)):
        assert got[i] == list(expected[i]), f"request {i} diverged from the reference"

    stats = engine.stats
    assert stats.num_generated_tokens == sum(n for _, n, _ in WORKLOAD)
    # Chunked prefill really happened: the 61-token prompt cannot fit one 16-token step.
    assert stats.num_steps > sum(n for _, n, _ in WORKLOAD) / 6
    if pressure_counter is not None:
        assert getattr(stats, pressure_counter) > 0, f"{scenario}: no preemption was forced"
    bm = engine.block_manager
    bm.end_step()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_free_host_blocks == bm.num_host_blocks
    assert not engine.has_unfinished() and not engine.scheduler.has_unfinished()


def test_shared_prefix_is_served_from_the_prefix_cache():
    engine = make_engine(tiny_model("tiny"), block_size=BLOCK_SIZE, max_num_batched_tokens=16)
    cached = {}
    step, ids = 0, {}
    while step == 0 or engine.has_unfinished():
        for i, (prompt, n, arrival) in enumerate(WORKLOAD):
            if arrival == step:
                ids[engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0))] = i
        for out in engine.step():
            if out.finished:
                cached[ids[out.request_id]] = out.metrics.num_cached_tokens
        step += 1
    # Requests 4 and 6 arrive after request 1 computed the shared blocks.
    assert cached[4] == cached[6] == len(SHARED_PREFIX)
    assert cached[0] == cached[2] == 0
