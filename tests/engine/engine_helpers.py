"""Factories and a fake model runner for policy-only engine tests (no model, no tensors).

``FakeRunner`` stands in for the model runner: its "KV cache" stores, in every slot, the token
id whose KV would live there. Before computing it checks that the cache already holds exactly
the sequence's first ``num_computed_tokens`` tokens, so any bookkeeping error in block tables,
prefix sharing or swap pairs shows up as a wrong token in a slot.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from fastserve_ray.engine import (
    BlockManager,
    SamplingParams,
    Scheduler,
    SchedulerOutput,
    Sequence,
    StateSlotManager,
    create_scheduler,
)

VOCAB_SIZE = 1000
_prompt_seeds = itertools.count()  # distinct prompts across calls: no accidental prefix hits


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    policy: str = "fcfs",
    *,
    num_host_blocks: int = 0,
    enable_prefix_caching: bool = True,
    recurrent: bool = False,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    **kwargs,
) -> Scheduler:
    """A scheduler over a fresh block manager (or state-slot manager when ``recurrent``)."""
    if recurrent:
        bm = StateSlotManager(num_blocks, num_host_blocks)
    else:
        bm = BlockManager(num_blocks, block_size, num_host_blocks, enable_prefix_caching)
    kwargs.setdefault("clock", FakeClock())
    return create_scheduler(
        policy,
        bm,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        **kwargs,
    )


def make_requests(
    num_requests: int,
    prompt_len: int | Iterable[int] = 8,
    max_tokens: int = 4,
    *,
    shared_prefix: list[int] | None = None,
    **params,
) -> list[Sequence]:
    """Sequences with distinct prompts (after an optional shared prefix)."""
    lens = [prompt_len] * num_requests if isinstance(prompt_len, int) else list(prompt_len)
    seqs = []
    for n in lens:
        prefix = list(shared_prefix or [])
        first = 100 + next(_prompt_seeds) * 7919  # token ids of one prompt never repeat a run
        own = [(first + 37 * j) % VOCAB_SIZE for j in range(n - len(prefix))]
        seqs.append(Sequence(prefix + own, SamplingParams(max_tokens=max_tokens, **params)))
    return seqs


def fake_token(seq: Sequence) -> int:
    """The deterministic token a fake model samples next (same after recompute)."""
    return (seq.seq_id * 7 + seq.num_tokens * 13) % VOCAB_SIZE


class FakeRunner:
    """Applies swap pairs to a token-id "KV cache" and checks every read against the truth."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        bm = scheduler.block_manager
        self.is_recurrent = isinstance(bm, StateSlotManager)
        width = 1 if self.is_recurrent else bm.block_size
        self.device: list[list] = [[None] * width for _ in range(bm.num_blocks)]
        self.host: list[list] = [[None] * width for _ in range(bm.num_host_blocks)]

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        """Execute one step; return the sampled token of each sequence that samples."""
        # The documented order: every swap-out, then every swap-in, then compute.
        for device_block, host_block in out.blocks_to_swap_out:
            self.host[host_block] = list(self.device[device_block])
        for host_block, device_block in out.blocks_to_swap_in:
            self.device[device_block] = list(self.host[host_block])
        seqs = [self.scheduler.get_sequence(item.seq_id) for item in out.scheduled]
        for item, seq in zip(out.scheduled, seqs):  # reads first: nothing may read a write
            assert item.num_computed_tokens == seq.num_computed_tokens
            self._check_cached(seq, item.num_computed_tokens)
        written: set[tuple[int, int]] = set()
        for item, seq in zip(out.scheduled, seqs):
            self._write(seq, item.num_computed_tokens, item.num_new_tokens, written)
        return {
            item.seq_id: fake_token(seq)
            for item, seq in zip(out.scheduled, seqs)
            if item.is_sample
        }

    def _check_cached(self, seq: Sequence, num_computed: int) -> None:
        if self.is_recurrent:
            state = self.device[seq.block_table[0]][0] if num_computed else ()
            assert state == tuple(seq.token_ids[:num_computed]), f"bad state for {seq}"
            return
        bs = self.scheduler.block_manager.block_size
        for pos in range(num_computed):
            got = self.device[seq.block_table[pos // bs]][pos % bs]
            assert got == seq.token_ids[pos], f"{seq}: slot {pos} holds {got}"

    def _write(self, seq: Sequence, start: int, num_new: int, written: set) -> None:
        if self.is_recurrent:
            slot = seq.block_table[0]
            assert slot not in written
            written.add(slot)
            self.device[slot][0] = tuple(seq.token_ids[: start + num_new])
            return
        bm = self.scheduler.block_manager
        bs = bm.block_size
        assert len(seq.block_table) * bs >= start + num_new, f"{seq}: too few blocks"
        for pos in range(start, start + num_new):
            block = seq.block_table[pos // bs]
            assert bm.ref_count(block) == 1, f"{seq}: writing shared block {block}"
            assert (block, pos % bs) not in written, "two sequences write one slot"
            written.add((block, pos % bs))
            self.device[block][pos % bs] = seq.token_ids[pos]


def check_step_limits(scheduler: Scheduler, out: SchedulerOutput) -> None:
    """A step never exceeds the token budget or the batch size, and schedules each id once."""
    ids = [s.seq_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    assert len(ids) <= scheduler.max_num_seqs
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= scheduler.max_num_batched_tokens
    assert all(s.num_new_tokens >= 1 for s in out.scheduled)


def step(scheduler: Scheduler, runner: FakeRunner | None = None) -> tuple[SchedulerOutput, list]:
    """One engine step: schedule, (fake) run, postprocess; returns (output, finished)."""
    out = scheduler.schedule()
    check_step_limits(scheduler, out)
    if runner is not None:
        sampled = runner.run(out)
    else:
        sampled = {
            s.seq_id: fake_token(scheduler.get_sequence(s.seq_id))
            for s in out.scheduled
            if s.is_sample
        }
    return out, scheduler.postprocess(out, sampled)


def run_to_completion(
    scheduler: Scheduler, runner: FakeRunner | None = None, max_steps: int = 10_000
) -> list[SchedulerOutput]:
    """Step until nothing is unfinished; fails on a stall (a step that does nothing)."""
    outputs = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return outputs
        out, _ = step(scheduler, runner)
        assert not out.is_empty, f"scheduler stalled with {list(scheduler.sequences.values())}"
        outputs.append(out)
    raise AssertionError(f"not finished after {max_steps} steps")


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    """No device or host block is still held by anyone."""
    bm = scheduler.block_manager
    bm.end_step()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_free_host_blocks == bm.num_host_blocks
    if isinstance(bm, BlockManager):
        assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
