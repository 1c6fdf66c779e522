"""What a cached forward needs to know: where each new token sits and where its K/V go.

The model never owns a cache. The caller (the engine, or ``generate`` for one
prompt) allocates the storage with ``model.allocate_cache`` and describes each
step with a ``CacheContext``. A Llama cache is a pool of fixed-size blocks
(paged, as in vLLM); a recurrent cache is a pool of fixed-size state slots.
A contiguous cache is just the paged layout with one block per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class CacheContext:
    """Layout of one cached forward over S sequences holding N new tokens in total."""

    positions: torch.Tensor  # (N,) int64: position of each new token within its sequence
    query_start_loc: torch.Tensor  # (S+1,) int64: seq s owns new-token rows [q[s], q[s+1])
    seq_lens: torch.Tensor  # (S,) int64: tokens cached for each sequence after this step
    slot_mapping: torch.Tensor  # (N,) int64: flat cache slot receiving each new token's K/V
    block_tables: torch.Tensor  # (S, max_blocks) int64: physical block ids, padded with 0
    block_size: int
    # Host copies of the lengths (python ints), so the forward never waits on the device to
    # learn a shape.
    host_query_lens: tuple[int, ...]  # (S,) new tokens per sequence
    host_seq_lens: tuple[int, ...]  # (S,) == seq_lens
    state_slots: torch.Tensor | None = None  # (S,) int64: recurrent state slot per sequence
    # The engine plan's choices for this step (engine/plan.py); the defaults are what a caller
    # without an engine (``generate``, tests) gets: per-sequence attention, native kernels where
    # they exist.
    attention: str = "paged"  # "paged" | "flex"
    native_kernels: bool = True

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def build_cache_context(
    num_cached: Sequence[int],
    num_new: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    state_slots: Sequence[int] | None = None,
) -> CacheContext:
    """Build a CacheContext from per-sequence counts: tokens already cached and new ones."""
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    for cached, new, table in zip(num_cached, num_new, block_tables):
        for pos in range(cached, cached + new):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + new)
    seq_lens = [c + n for c, n in zip(num_cached, num_new)]
    width = max((len(t) for t in block_tables), default=1) or 1
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]

    def as_tensor(x: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64, device=device)

    return CacheContext(
        positions=as_tensor(positions),
        query_start_loc=as_tensor(starts),
        seq_lens=as_tensor(seq_lens),
        slot_mapping=as_tensor(slots),
        block_tables=as_tensor(padded),
        block_size=block_size,
        host_query_lens=tuple(num_new),
        host_seq_lens=tuple(seq_lens),
        state_slots=None if state_slots is None else as_tensor(list(state_slots)),
    )
