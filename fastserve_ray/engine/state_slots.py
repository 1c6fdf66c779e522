"""Recurrent models' KV cache: one fixed state slot per sequence, behind the block verbs.

An RNN/LSTM/GRU carries a fixed-size state instead of per-token KV, so a sequence needs exactly
one slot however long it grows. Giving the slots the block manager's interface lets the same
schedulers (chunked prefill, preemption, swapping) drive recurrent models unchanged.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable

from fastserve_ray.engine.block_manager import HostPool
from fastserve_ray.engine.sequence import Sequence
from fastserve_ray.errors import ConfigError


class StateSlotManager:
    """Recurrent models: one fixed state slot per sequence, behind the block manager's verbs.

    ``seq.block_table`` is ``[slot]``; a slot holds the state after ``num_computed_tokens``
    tokens, so a sequence scheduled with ``num_computed_tokens == 0`` must start from a zero
    state. There is no prefix sharing: a state summarises the whole prefix, not one block.
    """

    def __init__(self, num_slots: int, num_host_slots: int = 0) -> None:
        if num_slots < 1:
            raise ConfigError(f"num_slots must be >= 1, got {num_slots}")
        self.num_blocks = num_slots
        self.num_host_blocks = num_host_slots
        self._free: deque[int] = deque(range(num_slots))
        self._host = HostPool(num_host_slots)

    @property
    def num_free_blocks(self) -> int:
        """Free device state slots."""
        return len(self._free)

    @property
    def num_free_host_blocks(self) -> int:
        """Free host state slots."""
        return self._host.num_free

    @property
    def max_seq_len(self) -> int:
        """A state slot holds any length."""
        return sys.maxsize

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        """One slot, whatever the length."""
        return 1

    def num_prefix_hit_tokens(self, seq: Sequence) -> int:
        """Always 0: states are not shared."""
        return 0

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """1 for a sequence without a device slot, else 0."""
        return 0 if seq.block_table else 1

    def num_reclaimable_blocks(self, seqs: Iterable[Sequence]) -> int:
        """Slots held by ``seqs``."""
        return sum(len(seq.block_table) for seq in seqs)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether a free slot exists."""
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give ``seq`` a slot (its state starts from zero)."""
        assert not seq.block_table and not seq.host_block_table and seq.num_computed_tokens == 0
        if not self._free:
            raise RuntimeError(f"no free state slot for sequence {seq.seq_id}")
        seq.block_table.append(self._free.popleft())

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        """A resident sequence's slot always has room."""
        return bool(seq.block_table)

    def append(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Nothing to grow."""
        assert seq.block_table, f"sequence {seq.seq_id} holds no state slot"

    def free(self, seq: Sequence) -> None:
        """Release the device and host slots of ``seq``."""
        self._free.extend(seq.block_table)
        seq.block_table.clear()
        for host_slot in seq.host_block_table:
            self._host.release(host_slot)
        seq.host_block_table.clear()
        seq.num_computed_tokens = 0

    def can_swap_out(self, seq: Sequence) -> bool:
        """Whether a host slot is free for resident ``seq``'s computed state."""
        return bool(seq.block_table) and seq.num_computed_tokens > 0 and self._host.num_free > 0

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move the state to a host slot; returns [(device slot, host slot)]."""
        if not self.can_swap_out(seq):
            raise RuntimeError(f"cannot swap out sequence {seq.seq_id}")
        slot, host_slot = seq.block_table.pop(), self._host.take()
        self._free.append(slot)
        seq.host_block_table.append(host_slot)
        return [(slot, host_slot)]

    def can_swap_in(self, seq: Sequence, num_new_tokens: int = 0) -> bool:
        """Whether a device slot is free."""
        return self.num_free_blocks >= 1

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move the state back to a device slot; returns [(host slot, device slot)]."""
        if not seq.host_block_table or not self._free:
            raise RuntimeError(f"cannot swap in sequence {seq.seq_id}")
        host_slot, slot = seq.host_block_table.pop(), self._free.popleft()
        seq.block_table.append(slot)
        self._host.release_after_step(host_slot)
        return [(host_slot, slot)]

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Nothing to cache."""

    def end_step(self) -> None:
        """The runner applied this step's swap copies: host slots read by swap-ins are free."""
        self._host.end_step()
