"""Schedulers: each step, which sequences run and how many tokens each computes. Policy only.

A step is three calls (nano-vllm): ``out = scheduler.schedule()``; the model runner executes
``out``; ``scheduler.postprocess(out, sampled_token_ids)``. The scheduler moves ids and counts,
never tensors. Policies differ only in their priority order (``_priority``) and its bookkeeping;
the step mechanics below are shared:

1. Candidates: the unfinished sequences walked in priority order until ``max_num_seqs`` (and
   ``max_num_batched_tokens``, since each costs at least one token) are scheduled. A sequence
   left out keeps its KV where it is and simply waits: preemption at token granularity. A
   prefill that finds the step's token budget spent keeps its place and is passed over, so a
   lower decode takes the slot: a step never runs short while some sequence could run (cutting
   the list first left MLFQ's steps half empty behind prompts that could not run yet). Tokens
   reserved for decodes that then could not run (no block, no slot) go back to the prefills
   passed over, so a decode stuck behind a higher prefill that holds the blocks cannot leave
   every step empty.
2. Token budget: decodes cost one token each and are reserved first; prefill chunks share the
   rest of ``max_num_batched_tokens`` in priority order. A long prompt is split into chunks
   across steps, so it never delays anyone's decode and no step exceeds the budget.
3. Memory: walking candidates by priority, one that lacks blocks evicts idle resident sequences
   of lower priority, lowest first (to the host tier when the mode is "swap" and it has room,
   else freed for recompute), if that can make enough room. Once a candidate cannot fit, lower
   ones may run only if they need no new block (resident, and the step's tokens fit in the
   blocks they hold): they cannot take memory the higher one waits for, and their KV is not
   left idle on the device while they could decode. The highest candidate can always evict all
   others and ``add`` rejects a sequence that could not fit alone, so every step makes
   progress: no deadlock, and running out of blocks never raises.
4. Proactive swap (mode "swap", ``swap_watermark`` > 0): when free device blocks fall below
   the watermark, idle residents are swapped out lowest priority first, ahead of need; when
   there is room for a swapped sequence plus twice the watermark, the highest-priority swapped
   sequences are swapped back in ahead of their turn.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastserve_ray.engine.block_manager import KVCacheManager
from fastserve_ray.engine.engine_config import PREEMPTION_MODES, SCHEDULER_POLICIES
from fastserve_ray.engine.errors import RequestError
from fastserve_ray.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from fastserve_ray.engine.sequence import Sequence, SequenceStatus
from fastserve_ray.errors import ConfigError

# The step's output types live in their own module (mlfq.py and the runner import them without
# the policies); re-exported here for callers that import them from the scheduler.
__all__ = [
    "PREEMPTION_MODES", "SCHEDULER_POLICIES", "FCFSScheduler", "ScheduledSequence", "Scheduler",
    "SchedulerOutput",
]


def kv_capacity_error(num_prompt_tokens: int, max_tokens: int, capacity_tokens: int) -> RequestError:
    """The error for a request whose prompt + max_tokens could never fit in the KV cache."""
    return RequestError(
        f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the KV cache "
        f"capacity of {capacity_tokens} tokens",
        "max_tokens",
    )


class Scheduler:
    """Shared step mechanics; subclasses define the priority order and its bookkeeping."""

    policy = "base"

    def __init__(
        self,
        block_manager: KVCacheManager,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        preemption_mode: str = "recompute",
        swap_watermark: float = 0.0,
        eos_token_id: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if preemption_mode not in PREEMPTION_MODES:
            raise ConfigError(
                f"preemption_mode must be one of {PREEMPTION_MODES}, got {preemption_mode!r}"
            )
        if not 0 <= swap_watermark < 0.5:
            raise ConfigError(f"swap_watermark must be in [0, 0.5), got {swap_watermark!r}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.swap_watermark = swap_watermark
        self.eos_token_id = eos_token_id
        self.clock = clock
        self.sequences: dict[int, Sequence] = {}  # unfinished only
        self._num_enqueued = 0

    # -- policy hooks -------------------------------------------------------------------------

    def _priority(self, seq: Sequence) -> tuple[Any, ...]:
        """Sort key: smaller runs first and is preempted last."""
        raise NotImplementedError

    def _on_add(self, seq: Sequence) -> None:
        """Place a new sequence (MLFQ: skip-join)."""

    def _before_schedule(self, now: float) -> None:
        """Adjust priorities before a step (MLFQ: starvation promotion)."""

    def _on_computed(self, seq: Sequence, item: ScheduledSequence) -> None:
        """Account a step's work (MLFQ: quantum use and demotion)."""

    def _next_queue_order(self) -> int:
        self._num_enqueued += 1
        return self._num_enqueued

    # -- requests -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; RequestError if it could never fit in the KV cache."""
        if seq.seq_id in self.sequences:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.host_block_table:
            raise ValueError(f"sequence {seq.seq_id} is not new (status {seq.status.name})")
        bm = self.block_manager
        max_tokens = seq.num_prompt_tokens + seq.sampling_params.max_tokens
        if bm.num_blocks_for_tokens(max_tokens) > bm.num_blocks:
            raise kv_capacity_error(seq.num_prompt_tokens, seq.sampling_params.max_tokens, bm.max_seq_len)
        now = self.clock()
        if seq.arrival_time is None:
            seq.arrival_time = now
        seq.last_scheduled_time = now  # waiting time counts from arrival
        seq.queue_order = self._next_queue_order()
        self._on_add(seq)
        self.sequences[seq.seq_id] = seq

    def finish(
        self, seq_id: int, status: SequenceStatus = SequenceStatus.FINISHED_STOPPED
    ) -> Sequence | None:
        """End a sequence (e.g. the engine matched a stop string) and free its blocks."""
        if not status.is_finished:
            raise ValueError(f"finish() needs a FINISHED_* status, got {status.name}")
        seq = self.sequences.pop(seq_id, None)
        if seq is not None:
            self.block_manager.free(seq)
            seq.status = status
        return seq

    def abort(self, seq_id: int) -> Sequence | None:
        """Drop a sequence whatever its state; None if it is unknown or already finished."""
        return self.finish(seq_id, SequenceStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        """Whether any sequence is still waiting, running or swapped."""
        return bool(self.sequences)

    def get_sequence(self, seq_id: int) -> Sequence:
        """The unfinished sequence with this id (KeyError if none)."""
        return self.sequences[seq_id]

    def _count(self, status: SequenceStatus) -> int:
        return sum(1 for seq in self.sequences.values() if seq.status is status)

    @property
    def num_waiting(self) -> int:
        """Sequences without KV anywhere (new or preempted for recompute)."""
        return self._count(SequenceStatus.WAITING)

    @property
    def num_running(self) -> int:
        """Sequences with KV on the device (scheduled or idle)."""
        return self._count(SequenceStatus.RUNNING)

    @property
    def num_swapped(self) -> int:
        """Sequences whose KV sits in the host tier."""
        return self._count(SequenceStatus.SWAPPED)

    # -- the step -----------------------------------------------------------------------------

    @staticmethod
    def _is_decode(seq: Sequence) -> bool:
        return seq.status is not SequenceStatus.WAITING and seq.num_uncomputed_tokens == 1

    def schedule(self) -> SchedulerOutput:
        """Choose this step's sequences and token counts; allocate, evict and swap blocks."""
        bm = self.block_manager
        bm.end_step()  # in case the previous step's postprocess was skipped
        now = self.clock()
        self._before_schedule(now)
        out = SchedulerOutput()
        ordered = sorted(self.sequences.values(), key=self._priority)
        max_seqs = min(self.max_num_seqs, self.max_num_batched_tokens)
        # One token per decode is reserved first (at most a full batch of them).
        reserved = min(sum(map(self._is_decode, ordered)), max_seqs)
        prefill_budget = self.max_num_batched_tokens - reserved
        scheduled: set[int] = set()
        touched: set[int] = set()  # evicted or swapped this step: not scheduled again
        passed_over: list[int] = []  # positions of prefills skipped because the budget was spent
        num_decodes = 0
        blocked_at = len(ordered)  # position of the first candidate that could not get memory
        for pos, seq in enumerate(ordered):
            if len(scheduled) >= max_seqs:
                break
            if seq.seq_id in touched:
                continue
            is_decode = self._is_decode(seq)
            if not is_decode and prefill_budget <= 0:
                passed_over.append(pos)
                continue  # budget spent; decodes further down still run
            num_new = 1 if is_decode else self._prefill_chunk(seq, prefill_budget)
            if pos > blocked_at and not self._fits_in_place(seq, num_new):
                continue  # it would take memory the blocked higher candidate waits for
            if not self._make_room(seq, num_new, ordered[pos + 1 :], touched, out):
                blocked_at = min(blocked_at, pos)
                continue
            self._schedule_one(seq, num_new, is_decode, now, out)
            scheduled.add(seq.seq_id)
            if is_decode:
                num_decodes += 1
            else:
                prefill_budget -= num_new
        # Tokens reserved for decodes that did not run (out of memory or slots) go to the
        # prefills passed over above, in priority order. Without this a decode that cannot get
        # a block behind a higher prefill that holds them would leave the step empty forever.
        prefill_budget += reserved - num_decodes
        for pos in passed_over:
            seq = ordered[pos]
            if prefill_budget <= 0 or len(scheduled) >= max_seqs:
                break
            if seq.seq_id in touched:
                continue
            num_new = self._prefill_chunk(seq, prefill_budget)
            if pos > blocked_at and not self._fits_in_place(seq, num_new):
                continue
            lower = [s for s in ordered[pos + 1 :] if s.seq_id not in scheduled]
            if not self._make_room(seq, num_new, lower, touched, out):
                blocked_at = min(blocked_at, pos)
                continue
            self._schedule_one(seq, num_new, False, now, out)
            scheduled.add(seq.seq_id)
            prefill_budget -= num_new
        if self.preemption_mode == "swap" and self.swap_watermark > 0:
            self._proactive_swap(ordered, scheduled, touched, out)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _fits_in_place(self, seq: Sequence, num_new: int) -> bool:
        """Whether ``seq`` is resident and its next ``num_new`` tokens need no further block."""
        return (
            seq.status is SequenceStatus.RUNNING
            and self.block_manager.num_blocks_needed(seq, num_new) == 0
        )

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of ``seq``'s prompt (or recompute) to run this step within ``budget``."""
        # Prefix hits never cover the last token, so at least one token is left.
        start = seq.num_computed_tokens + self.block_manager.num_prefix_hit_tokens(seq)
        return min(seq.num_tokens - start, budget)

    def _schedule_one(
        self, seq: Sequence, num_new: int, is_decode: bool, now: float, out: SchedulerOutput
    ) -> None:
        """Give ``seq`` its blocks for ``num_new`` tokens (room already made) and list it."""
        bm = self.block_manager
        if seq.status is SequenceStatus.WAITING:
            bm.allocate(seq, num_new)  # prefix hits advance num_computed_tokens here
        elif seq.status is SequenceStatus.SWAPPED:
            out.blocks_to_swap_in.extend(bm.swap_in(seq))
            out.swapped_in_seq_ids.append(seq.seq_id)
            bm.append(seq, num_new)
        else:
            bm.append(seq, num_new)
        seq.status = SequenceStatus.RUNNING
        start = seq.num_computed_tokens
        out.scheduled.append(
            ScheduledSequence(seq.seq_id, start, num_new, not is_decode, start + num_new == seq.num_tokens)
        )
        seq.last_scheduled_time = now

    def _make_room(
        self,
        seq: Sequence,
        num_new: int,
        lower: list[Sequence],
        touched: set[int],
        out: SchedulerOutput,
    ) -> bool:
        """Evict lower-priority idle residents until ``seq`` fits; False if it cannot."""
        bm = self.block_manager
        if bm.num_blocks_needed(seq, num_new) <= bm.num_free_blocks:
            return True
        # Lowest priority first; everything in `lower` is unscheduled this step.
        victims = [s for s in reversed(lower) if s.status is SequenceStatus.RUNNING]
        if bm.num_blocks_needed(seq, num_new) > bm.num_free_blocks + bm.num_reclaimable_blocks(
            victims
        ):
            return False  # evicting would lose their KV and still not make room
        for victim in victims:
            self._preempt(victim, out)
            touched.add(victim.seq_id)
            if bm.num_blocks_needed(seq, num_new) <= bm.num_free_blocks:
                return True
        return False

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Take a resident sequence's device blocks: swap to host if allowed and room, else drop."""
        bm = self.block_manager
        seq.num_preemptions += 1
        if self.preemption_mode == "swap" and bm.can_swap_out(seq):
            out.blocks_to_swap_out.extend(bm.swap_out(seq))
            out.swapped_out_seq_ids.append(seq.seq_id)
            seq.status = SequenceStatus.SWAPPED
        else:
            bm.free(seq)  # num_computed_tokens -> 0: prompt and outputs are recomputed
            out.preempted_seq_ids.append(seq.seq_id)
            seq.status = SequenceStatus.WAITING

    def _proactive_swap(
        self,
        ordered: list[Sequence],
        scheduled: set[int],
        touched: set[int],
        out: SchedulerOutput,
    ) -> None:
        """Swap idle low-priority KV out below the watermark; swap high-priority KV back in."""
        bm = self.block_manager
        low = math.ceil(self.swap_watermark * bm.num_blocks)
        for seq in reversed(ordered):
            if bm.num_free_blocks >= low:
                break
            if (
                seq.status is SequenceStatus.RUNNING
                and seq.seq_id not in scheduled
                and bm.can_swap_out(seq)
            ):
                out.blocks_to_swap_out.extend(bm.swap_out(seq))
                out.swapped_out_seq_ids.append(seq.seq_id)
                seq.status = SequenceStatus.SWAPPED
                touched.add(seq.seq_id)
        # Twice the watermark of slack, so a swap-in is not undone by the next step's growth.
        for seq in ordered:
            if seq.status is not SequenceStatus.SWAPPED or seq.seq_id in touched:
                continue
            if bm.num_blocks_needed(seq, 0) + 2 * low > bm.num_free_blocks:
                break  # strict priority: a lower one must not jump the queue
            out.blocks_to_swap_in.extend(bm.swap_in(seq))
            out.swapped_in_seq_ids.append(seq.seq_id)
            seq.status = SequenceStatus.RUNNING

    def postprocess(
        self, output: SchedulerOutput, sampled_token_ids: Mapping[int, int]
    ) -> list[Sequence]:
        """Record a finished step: advance counters, append samples, finish; return finished."""
        self.block_manager.end_step()
        finished = []
        for item in output.scheduled:
            seq = self.sequences.get(item.seq_id)
            if seq is None:
                continue  # aborted while the step ran
            if seq.num_computed_tokens != item.num_computed_tokens:
                raise RuntimeError(f"postprocess: stale output for sequence {seq.seq_id}")
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_computed_blocks(seq)
            self._on_computed(seq, item)
            if not item.is_sample:
                continue
            seq.append_token(sampled_token_ids[item.seq_id])
            status = self._stop_status(seq)
            if status is not None:
                self.finish(seq.seq_id, status)
                finished.append(seq)
        return finished

    def _stop_status(self, seq: Sequence) -> SequenceStatus | None:
        params, token = seq.sampling_params, seq.last_token_id
        if token in params.stop_token_ids or (
            not params.ignore_eos and token == self.eos_token_id
        ):
            return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= params.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        return None


class FCFSScheduler(Scheduler):
    """First come, first served (vLLM's default): arrival order is the priority.

    A sequence preempted for memory keeps its place, so it resumes before later arrivals, and
    victims are always the latest arrivals.
    """

    policy = "fcfs"

    def _priority(self, seq: Sequence) -> tuple[int]:
        return (seq.queue_order,)
