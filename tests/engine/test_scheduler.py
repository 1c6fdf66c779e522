"""Shared step mechanics with the FCFS policy: batching, chunked prefill, preemption, stops."""

import re

import pytest
from engine_helpers import (
    FakeRunner,
    assert_all_blocks_free,
    make_requests,
    make_scheduler,
    run_to_completion,
    step,
)

from fastserve_ray.engine import (
    BlockManager,
    RequestError,
    SamplingParams,
    Sequence,
    SequenceStatus,
    create_scheduler,
)
from fastserve_ray.errors import ConfigError


def test_fcfs_serves_in_arrival_order():
    sched = make_scheduler(max_num_seqs=2)
    seqs = make_requests(4, prompt_len=6, max_tokens=3)
    for seq in seqs:
        sched.add(seq)
    out, _ = step(sched)
    assert [s.seq_id for s in out.scheduled] == [seqs[0].seq_id, seqs[1].seq_id]
    finish_order = []
    while sched.has_unfinished():
        _, finished = step(sched)
        finish_order += [s.seq_id for s in finished]
    assert finish_order == [s.seq_id for s in seqs]
    assert all(s.status is SequenceStatus.FINISHED_LENGTH for s in seqs)
    assert all(s.num_output_tokens == 3 for s in seqs)
    assert_all_blocks_free(sched)


def test_scheduled_counts_describe_prefill_then_decode():
    sched = make_scheduler(max_num_batched_tokens=4)
    (seq,) = make_requests(1, prompt_len=10, max_tokens=2)
    sched.add(seq)
    chunks = [step(sched)[0].scheduled[0] for _ in range(3)]
    assert [(c.num_computed_tokens, c.num_new_tokens, c.is_sample) for c in chunks] == [
        (0, 4, False), (4, 4, False), (8, 2, True)
    ]
    assert all(c.is_prefill for c in chunks)
    assert seq.num_output_tokens == 1 and seq.num_computed_tokens == 10
    decode = step(sched)[0].scheduled[0]
    assert (decode.num_computed_tokens, decode.num_new_tokens, decode.is_prefill) == (10, 1, False)
    assert decode.is_sample and seq.is_finished


def test_chunked_prefill_never_stalls_decodes():
    budget = 16
    sched = make_scheduler(num_blocks=128, max_num_batched_tokens=budget, max_num_seqs=8)
    runner = FakeRunner(sched)
    decoders = make_requests(3, prompt_len=4, max_tokens=60)
    for seq in decoders:
        sched.add(seq)
    step(sched, runner)  # prefill the three short prompts
    (long,) = make_requests(1, prompt_len=200, max_tokens=2)
    sched.add(long)
    num_steps = 0
    while long.num_computed_tokens < long.num_prompt_tokens:
        before = [s.num_output_tokens for s in decoders]
        out, _ = step(sched, runner)
        num_steps += 1
        assert out.num_batched_tokens <= budget
        assert [s.num_output_tokens for s in decoders] == [b + 1 for b in before]
        (chunk,) = [s for s in out.scheduled if s.seq_id == long.seq_id]
        assert chunk.num_new_tokens == min(budget - 3, 200 - chunk.num_computed_tokens)
    assert num_steps == -(-200 // (budget - 3))
    run_to_completion(sched, runner)
    assert_all_blocks_free(sched)


def test_recompute_preemption_evicts_the_latest_arrival():
    # 6 blocks of 4: two sequences of 8 prompt tokens fit, growth forces a preemption.
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=4)
    runner = FakeRunner(sched)
    first, second = make_requests(2, prompt_len=8, max_tokens=8)
    sched.add(first)
    sched.add(second)
    preempted = []
    outputs = run_to_completion(sched, runner)
    for out in outputs:
        preempted += out.preempted_seq_ids
    assert preempted and set(preempted) == {second.seq_id}
    assert second.num_preemptions >= 1
    # Recompute produced the same tokens a never-preempted run would have.
    assert first.num_output_tokens == second.num_output_tokens == 8
    assert_all_blocks_free(sched)


def test_swap_preemption_keeps_kv_in_the_host_tier():
    sched = make_scheduler(
        num_blocks=6, block_size=4, num_host_blocks=8, preemption_mode="swap", max_num_seqs=4
    )
    runner = FakeRunner(sched)
    first, second = make_requests(2, prompt_len=8, max_tokens=8)
    sched.add(first)
    sched.add(second)
    outputs = run_to_completion(sched, runner)
    swapped_out = [i for out in outputs for i in out.swapped_out_seq_ids]
    swapped_in = [i for out in outputs for i in out.swapped_in_seq_ids]
    assert swapped_out == [second.seq_id] and swapped_in == [second.seq_id]
    assert not any(out.preempted_seq_ids for out in outputs)
    (out_step,) = [o for o in outputs if o.swapped_out_seq_ids]
    assert out_step.blocks_to_swap_out and all(len(p) == 2 for p in out_step.blocks_to_swap_out)
    # No prefill work is repeated: prompt tokens are computed exactly once per sequence.
    assert sum(s.num_new_tokens for o in outputs for s in o.scheduled if s.is_prefill) == 16
    assert_all_blocks_free(sched)


def test_swap_mode_falls_back_to_recompute_without_host_room():
    sched = make_scheduler(num_blocks=6, block_size=4, num_host_blocks=1, preemption_mode="swap")
    first, second = make_requests(2, prompt_len=8, max_tokens=8)
    sched.add(first)
    sched.add(second)
    outputs = run_to_completion(sched, FakeRunner(sched))
    assert any(out.preempted_seq_ids for out in outputs)
    assert not any(out.swapped_out_seq_ids for out in outputs)
    assert_all_blocks_free(sched)


@pytest.mark.parametrize("where", ["waiting", "running", "swapped"])
def test_abort_frees_blocks_in_every_state(where):
    sched = make_scheduler(
        num_blocks=6, block_size=4, num_host_blocks=8, preemption_mode="swap", max_num_seqs=4
    )
    first, second = make_requests(2, prompt_len=8, max_tokens=8)
    sched.add(first)
    sched.add(second)
    if where != "waiting":
        step(sched)
    if where == "swapped":
        while second.status is not SequenceStatus.SWAPPED:
            step(sched)
    assert sched.abort(second.seq_id) is second
    assert second.status is SequenceStatus.FINISHED_ABORTED and second.finish_reason == "abort"
    assert sched.abort(second.seq_id) is None
    run_to_completion(sched)
    assert_all_blocks_free(sched)


def test_abort_during_a_step_is_ignored_by_postprocess():
    sched = make_scheduler()
    a, b = make_requests(2)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.abort(a.seq_id)
    sched.postprocess(out, {s.seq_id: 1 for s in out.scheduled})
    assert b.num_output_tokens == 1 and a.num_output_tokens == 0
    run_to_completion(sched)
    assert_all_blocks_free(sched)


def drive(sched, token: int) -> set[int]:
    """One step in which every sampling sequence samples ``token``; returns finished ids."""
    out = sched.schedule()
    finished = sched.postprocess(out, {s.seq_id: token for s in out.scheduled if s.is_sample})
    return {s.seq_id for s in finished}


def test_stop_conditions():
    sched = make_scheduler(eos_token_id=2)
    eos = Sequence([5], SamplingParams(max_tokens=10))
    length = Sequence([5], SamplingParams(max_tokens=3, ignore_eos=True))
    stop_id = Sequence([5], SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[9]))
    for seq in (eos, length, stop_id):
        sched.add(seq)
    assert drive(sched, 3) == set()
    assert drive(sched, 2) == {eos.seq_id}
    assert drive(sched, 9) == {length.seq_id, stop_id.seq_id}
    assert eos.status is SequenceStatus.FINISHED_STOPPED and eos.output_token_ids == [3, 2]
    assert length.finish_reason == "length" and length.num_output_tokens == 3
    assert stop_id.finish_reason == "stop" and stop_id.output_token_ids == [3, 2, 9]
    assert_all_blocks_free(sched)


def test_engine_side_finish_for_stop_strings():
    sched = make_scheduler()
    (seq,) = make_requests(1, max_tokens=10)
    sched.add(seq)
    step(sched)
    assert sched.finish(seq.seq_id) is seq
    assert seq.status is SequenceStatus.FINISHED_STOPPED and not sched.has_unfinished()
    with pytest.raises(ValueError, match="FINISHED_"):
        sched.finish(seq.seq_id, SequenceStatus.RUNNING)
    assert_all_blocks_free(sched)


def test_add_rejects_what_can_never_fit_and_duplicates():
    sched = make_scheduler(num_blocks=4, block_size=4)  # 16 tokens in all
    with pytest.raises(RequestError, match="exceeds the KV cache capacity of 16 tokens") as info:
        sched.add(Sequence([1] * 10, SamplingParams(max_tokens=7)))
    assert info.value.param == "max_tokens"
    seq = Sequence([1] * 10, SamplingParams(max_tokens=6))
    sched.add(seq)
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(seq)


def test_prefix_hits_skip_computation_in_the_scheduler():
    sched = make_scheduler(num_blocks=32, block_size=4)
    runner = FakeRunner(sched)
    prefix = list(range(1, 13))
    a, b = make_requests(2, prompt_len=14, max_tokens=2, shared_prefix=prefix)
    sched.add(a)
    step(sched, runner)
    sched.add(b)
    out, _ = step(sched, runner)
    (item,) = [s for s in out.scheduled if s.seq_id == b.seq_id]
    assert (item.num_computed_tokens, item.num_new_tokens) == (12, 2)
    assert b.num_cached_tokens == 12
    run_to_completion(sched, runner)
    assert_all_blocks_free(sched)


def test_recurrent_state_slots_run_through_the_same_scheduler():
    sched = make_scheduler(num_blocks=2, recurrent=True, max_num_seqs=4, max_num_batched_tokens=6)
    seqs = make_requests(5, prompt_len=[3, 9, 4, 12, 2], max_tokens=4)
    for seq in seqs:
        sched.add(seq)
    run_to_completion(sched, FakeRunner(sched))
    assert all(s.num_output_tokens == 4 for s in seqs)
    assert_all_blocks_free(sched)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(max_num_seqs=0), "max_num_seqs must be >= 1, got 0"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be >= 1, got 0"),
        (dict(preemption_mode="drop"), "preemption_mode must be one of"),
        (dict(swap_watermark=0.7), "swap_watermark must be in [0, 0.5), got 0.7"),
    ],
)
def test_scheduler_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        create_scheduler("fcfs", BlockManager(4, 4), **kwargs)


def test_unknown_policy():
    with pytest.raises(ConfigError, match="unknown scheduler policy 'lifo'"):
        create_scheduler("lifo", BlockManager(4, 4))


def test_a_blocked_prompt_does_not_idle_residents_that_need_no_new_block():
    """A higher-priority prompt that cannot get memory waits; a lower resident whose next token
    fits in the blocks it holds still decodes (it takes nothing the prompt waits for), and one
    that needs a fresh block waits. The walk used to end at the blocked prompt, leaving that
    KV idle on the device. The priorities are those of a preempted request that kept its place
    (fcfs): `high`, then the prompt, then `low`."""
    sched = make_scheduler(num_blocks=4, block_size=8, max_num_batched_tokens=64)
    high, low = make_requests(2, prompt_len=[9, 3], max_tokens=20)
    for seq in (high, low):
        sched.add(seq)
    step(sched)  # 2 + 1 blocks: one block left
    (blocked,) = make_requests(1, prompt_len=17, max_tokens=4)  # needs 3 blocks
    sched.add(blocked)
    high.queue_order, blocked.queue_order, low.queue_order = 1, 2, 3
    # Evicting `low` (1 block) would still leave the prompt short: nobody is evicted.
    for _ in range(5):  # `low` decodes positions 3..7, all inside its one block
        out, _ = step(sched)
        assert [s.seq_id for s in out.scheduled] == [high.seq_id, low.seq_id]
        assert not out.preempted_seq_ids and not blocked.block_table
    out, _ = step(sched)  # position 8 needs a second block: the free one is the prompt's due
    assert [s.seq_id for s in out.scheduled] == [high.seq_id]
    assert low.status is SequenceStatus.RUNNING and sched.block_manager.num_free_blocks == 1
    run_to_completion(sched)
    assert_all_blocks_free(sched)
