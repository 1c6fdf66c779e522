"""Skip-join MLFQ on the scheduler alone: placement, demotion, starvation, preemption order."""

import math
import re

import pytest
from engine_helpers import (
    FakeClock,
    FakeRunner,
    assert_all_blocks_free,
    make_requests,
    make_scheduler,
    run_to_completion,
    step,
)

from fastserve_ray.engine import BlockManager, MLFQScheduler, PrefillTimeTable, SequenceStatus
from fastserve_ray.errors import ConfigError

# One estimated second per prompt token, and a decode step costs one second: quanta 4, 8, 16, inf.
MLFQ_ARGS = dict(
    num_queues=4, base_quantum=4.0, prefill_time=lambda n: float(n), decode_time=1.0
)


def make_mlfq(**kwargs):
    return make_scheduler(policy="mlfq", **{**MLFQ_ARGS, **kwargs})


def test_quanta_double_per_level_and_the_last_is_unbounded():
    sched = make_mlfq()
    assert [sched.quantum(i) for i in range(4)] == [4.0, 8.0, 16.0, math.inf]


@pytest.mark.parametrize(("prompt_len", "level"), [(1, 0), (4, 0), (5, 1), (8, 1), (9, 2),
                                                   (16, 2), (17, 3), (40, 3)])
def test_skip_join_placement_by_estimated_prefill_time(prompt_len, level):
    sched = make_mlfq(num_blocks=64, block_size=4)
    (seq,) = make_requests(1, prompt_len=prompt_len, max_tokens=1)
    sched.add(seq)
    assert seq.queue_level == level == sched.skip_join_level(prompt_len)


def test_skip_join_with_a_profiled_table():
    # Profiled once at start-up: a fixed launch cost plus a per-token cost.
    table = PrefillTimeTable({1: 0.010, 64: 0.020, 512: 0.100})
    sched = make_scheduler(
        policy="mlfq", num_blocks=256, num_queues=5, base_quantum=0.012, prefill_time=table
    )
    short, medium, long = make_requests(3, prompt_len=[2, 64, 400], max_tokens=1)
    for seq in (short, medium, long):
        sched.add(seq)
    assert (short.queue_level, medium.queue_level, long.queue_level) == (0, 1, 3)
    assert sched.decode_time == pytest.approx(0.010)


def test_short_request_overtakes_a_long_one_that_arrived_first():
    sched = make_mlfq(num_blocks=64, max_num_seqs=1)
    long, short = make_requests(2, prompt_len=[30, 3], max_tokens=2)
    sched.add(long)
    sched.add(short)
    out, _ = step(sched)
    assert [s.seq_id for s in out.scheduled] == [short.seq_id]


def test_demotion_after_the_quantum_is_used_up():
    sched = make_mlfq(num_blocks=64)
    (seq,) = make_requests(1, prompt_len=2, max_tokens=40)
    sched.add(seq)
    step(sched)  # prefill: 2 of queue 0's 4 seconds
    assert (seq.queue_level, seq.quantum_used) == (0, 2.0)
    step(sched)
    assert (seq.queue_level, seq.quantum_used) == (0, 3.0)
    order = seq.queue_order
    step(sched)  # 4 used: demoted to the tail of queue 1
    assert (seq.queue_level, seq.quantum_used) == (1, 0.0) and seq.queue_order > order
    for _ in range(8):
        step(sched)
    assert seq.queue_level == 2
    for _ in range(16):
        step(sched)
    assert seq.queue_level == 3  # the last queue: never demoted further
    run_to_completion(sched)


def test_a_demoted_sequence_yields_to_a_new_short_one():
    sched = make_mlfq(num_blocks=64, max_num_seqs=1)
    (old,) = make_requests(1, prompt_len=2, max_tokens=50)
    sched.add(old)
    for _ in range(3):
        step(sched)
    assert old.queue_level == 1
    (new,) = make_requests(1, prompt_len=2, max_tokens=1)
    sched.add(new)
    out, finished = step(sched)
    assert [s.seq_id for s in out.scheduled] == [new.seq_id] and finished == [new]
    # Token-level preemption: the old one kept its KV on the device and resumes as a decode.
    assert old.status is SequenceStatus.RUNNING and old.block_table
    out, _ = step(sched)
    assert out.scheduled[0].seq_id == old.seq_id and not out.scheduled[0].is_prefill


def test_starvation_guard_promotes_to_the_top_queue():
    clock = FakeClock()
    sched = make_mlfq(num_blocks=256, max_num_seqs=1, starvation_threshold=10.0, clock=clock)
    (starving,) = make_requests(1, prompt_len=12, max_tokens=1)  # joins queue 2
    sched.add(starving)
    stream = iter(make_requests(100, prompt_len=2, max_tokens=1))
    for _ in range(9):  # a steady stream of short queue-0 jobs keeps it waiting
        sched.add(next(stream))
        clock.advance(1.0)
        out, _ = step(sched)
        assert starving.seq_id not in [s.seq_id for s in out.scheduled]
    assert starving.queue_level == 2
    sched.add(next(stream))
    clock.advance(1.0)  # 10 seconds unscheduled: promoted to the tail of queue 0
    step(sched)
    assert starving.queue_level == 0
    sched.add(next(stream))  # arrives after the promotion, so it queues behind
    clock.advance(1.0)
    out, _ = step(sched)
    assert [s.seq_id for s in out.scheduled] == [starving.seq_id]


def tight_mlfq(preemption_mode, num_host_blocks=16):
    # 8 blocks of 4 tokens; the watermark is off to isolate eviction on demand.
    return make_mlfq(
        num_blocks=8, block_size=4, num_host_blocks=num_host_blocks,
        preemption_mode=preemption_mode, swap_watermark=0.0, max_num_seqs=8,
    )


def fill_three_levels(sched):
    """Three resident sequences of 2 blocks each, in queues 3, 2 and 1 (in arrival order)."""
    seqs = make_requests(3, prompt_len=[8, 8, 8], max_tokens=20)
    for seq in seqs:
        sched.add(seq)
    step(sched)
    for seq, level in zip(seqs, (3, 2, 1)):
        seq.queue_level = level  # placed by hand: these tests are about eviction order
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)
    return seqs


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_evicts_the_lowest_priority_first(mode):
    sched = tight_mlfq(mode)
    low, mid, high = fill_three_levels(sched)  # 6 of 8 blocks used
    (newcomer,) = make_requests(1, prompt_len=12, max_tokens=2)  # 3 blocks + queue 2
    sched.add(newcomer)
    newcomer.queue_level = 0
    out, _ = step(sched)
    evicted = out.swapped_out_seq_ids if mode == "swap" else out.preempted_seq_ids
    assert evicted == [low.seq_id]  # one eviction makes room; the lowest queue goes
    assert newcomer.seq_id in [s.seq_id for s in out.scheduled]
    expected = SequenceStatus.SWAPPED if mode == "swap" else SequenceStatus.WAITING
    assert low.status is expected
    assert mid.status is high.status is SequenceStatus.RUNNING
    if mode == "swap":
        assert low.num_computed_tokens == 8 and len(out.blocks_to_swap_out) == 2
    else:
        assert low.num_computed_tokens == 0 and not out.blocks_to_swap_out
    run_to_completion(sched, None)
    assert_all_blocks_free(sched)


def test_recomputation_after_preemption_is_not_charged_again():
    sched = tight_mlfq("recompute")
    low, _, _ = fill_three_levels(sched)
    (newcomer,) = make_requests(1, prompt_len=12, max_tokens=2)
    sched.add(newcomer)
    newcomer.queue_level = 0
    out, _ = step(sched)
    assert out.preempted_seq_ids == [low.seq_id] and low.num_charged_tokens == 8
    used = low.quantum_used
    while True:
        out, _ = step(sched)
        (item,) = [s for s in out.scheduled if s.seq_id == low.seq_id] or [None]
        if item is not None:
            break
    # Prompt (8) + 1 sampled token are re-prefilled; only the one never computed is charged.
    assert (item.num_computed_tokens, item.num_new_tokens, item.is_prefill) == (0, 9, True)
    assert low.quantum_used == pytest.approx(used + 1.0) and low.num_charged_tokens == 9


def test_within_a_queue_the_latest_arrival_is_evicted_first():
    sched = tight_mlfq("recompute")
    seqs = make_requests(3, prompt_len=[8, 8, 8], max_tokens=20)
    for seq in seqs:
        sched.add(seq)
    step(sched)
    for seq in seqs:
        seq.queue_level = 2
    (newcomer,) = make_requests(1, prompt_len=16, max_tokens=2)  # 4 blocks: evicts two
    sched.add(newcomer)
    newcomer.queue_level = 0
    out, _ = step(sched)
    assert out.preempted_seq_ids == [seqs[2].seq_id, seqs[1].seq_id]


def test_swap_mode_without_host_room_recomputes():
    sched = tight_mlfq("swap", num_host_blocks=1)
    low, _, _ = fill_three_levels(sched)
    (newcomer,) = make_requests(1, prompt_len=12, max_tokens=2)
    sched.add(newcomer)
    newcomer.queue_level = 0
    out, _ = step(sched)
    assert out.preempted_seq_ids == [low.seq_id] and not out.swapped_out_seq_ids


def test_proactive_swap_out_when_free_blocks_fall_below_the_watermark():
    # 10 blocks, watermark 0.2: keep 2 free. Two 16-token prompts take 8 blocks.
    sched = make_mlfq(num_blocks=10, block_size=4, num_host_blocks=16, swap_watermark=0.2,
                      max_num_seqs=2)
    a, b = make_requests(2, prompt_len=[16, 16], max_tokens=3)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert not out.swapped_out_seq_ids and sched.block_manager.num_free_blocks == 2
    sched.max_num_seqs = 1  # b now idles behind a
    out, _ = step(sched)  # a's decode takes a 5th block: 1 free, below the watermark
    assert [s.seq_id for s in out.scheduled] == [a.seq_id] and not out.preempted_seq_ids
    assert out.swapped_out_seq_ids == [b.seq_id] and len(out.blocks_to_swap_out) == 4
    assert b.status is SequenceStatus.SWAPPED and b.num_computed_tokens == 16
    run_to_completion(sched)
    assert b.num_output_tokens == 3
    assert_all_blocks_free(sched)


def test_proactive_swap_round_trips_keep_every_token():
    # 20 blocks, watermark 0.1: keep 2 free; swap back in only with 4 to spare.
    sched = make_mlfq(num_blocks=20, block_size=4, num_host_blocks=32, swap_watermark=0.1,
                      max_num_seqs=2)
    seqs = make_requests(5, prompt_len=[12, 12, 12, 12, 12], max_tokens=12)
    for seq in seqs:
        sched.add(seq)
    outputs = run_to_completion(sched, FakeRunner(sched))  # checks every slot it reads
    swapped_out = [i for out in outputs for i in out.swapped_out_seq_ids]
    swapped_in = [i for out in outputs for i in out.swapped_in_seq_ids]
    assert swapped_out and sorted(swapped_in) == sorted(swapped_out)
    ahead_of_turn = [
        i for out in outputs for i in out.swapped_in_seq_ids
        if i not in {s.seq_id for s in out.scheduled}
    ]
    assert ahead_of_turn, "room returned: a swapped sequence should come back before its turn"
    assert all(s.num_output_tokens == 12 for s in seqs)
    assert_all_blocks_free(sched)


def test_prefill_time_table_interpolates_and_extrapolates():
    table = PrefillTimeTable([(10, 1.0), (20, 3.0)])
    assert table(0) == 0.0 and table(5) == pytest.approx(0.5) and table(15) == pytest.approx(2.0)
    assert table(30) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(num_queues=0), "num_queues must be >= 1, got 0"),
        (dict(base_quantum=0.0), "base_quantum must be a finite number > 0, got 0.0"),
        (dict(decode_time=-1.0), "decode_time must be a finite number > 0, got -1.0"),
        (dict(starvation_threshold=0), "starvation_threshold must be > 0 seconds or None, got 0"),
        (dict(prefill_time={}), "needs at least one (num_tokens, seconds) point"),
        (dict(prefill_time={0: 1.0}), "bad point (0, 1.0)"),
    ],
)
def test_mlfq_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        MLFQScheduler(BlockManager(4, 4), **kwargs)


def test_a_step_is_not_left_short_behind_prompts_the_budget_cannot_take():
    # Two long-running decodes sink to the last queue; two new prompts then outrank them. The
    # step's 6 tokens fit one prompt chunk of 4 (2 are reserved for the decodes), so the second
    # prompt waits and its slot goes to a decode, not to nobody.
    sched = make_mlfq(num_blocks=64, max_num_seqs=3, max_num_batched_tokens=6)
    old = make_requests(2, prompt_len=2, max_tokens=60)
    for seq in old:
        sched.add(seq)
    for _ in range(30):
        step(sched)
    assert all(seq.queue_level == 3 for seq in old)
    new = make_requests(2, prompt_len=12, max_tokens=2)
    for seq in new:
        sched.add(seq)
    out, _ = step(sched)
    ran = {s.seq_id: s.num_new_tokens for s in out.scheduled}
    assert ran[new[0].seq_id] == 4 and new[1].seq_id not in ran  # budget spent on the first
    assert sum(ran.get(s.seq_id, 0) for s in old) == 2  # both decodes took the free slots
    assert len(ran) == 3
