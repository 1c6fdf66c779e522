"""Paged KV cache bookkeeping: block ids, ref counts, prefix hashes, a host swap tier; no tensors.

The model runner owns two preallocated pools, device ``[num_blocks, block_size, ...]`` and host
``[num_host_blocks, block_size, ...]``; this module only decides which block ids each sequence
uses. ``seq.block_table[i]`` holds the KV of tokens ``[i * block_size, (i + 1) * block_size)``.

Prefix caching: once a block is full and its KV computed, it is hashed by (parent hash, token
ids) and can be shared, ref-counted, by any later sequence with the same prefix. A freed hashed
block stays reusable (an "evictable" block, still counted as free) until a new allocation
evicts it, least recently freed first. Only full blocks are ever shared, so the block a
sequence appends to is always private and no copy-on-write is needed.

Swap copies are returned as block-id pairs; see scheduler.SchedulerOutput for the order in
which the runner applies them.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from typing import Protocol

# The block hash lives with the summary a prefix-aware router reads, so that both compute it
# with the same function (prefix_summary.py); hash_block stays importable from here.
from fastserve_ray.engine.prefix_summary import NO_PARENT, hash_block
from fastserve_ray.engine.sequence import Sequence
from fastserve_ray.errors import ConfigError

_NO_PARENT = NO_PARENT  # parent hash of a sequence's first block


class KVCacheManager(Protocol):
    """What the scheduler needs from a cache manager (paged blocks or recurrent state slots)."""

    num_blocks: int
    num_host_blocks: int

    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_free_host_blocks(self) -> int: ...
    @property
    def max_seq_len(self) -> int: ...
    def num_blocks_for_tokens(self, num_tokens: int) -> int: ...
    def num_prefix_hit_tokens(self, seq: Sequence) -> int: ...
    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int: ...
    def num_reclaimable_blocks(self, seqs: Iterable[Sequence]) -> int: ...
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool: ...
    def allocate(self, seq: Sequence, num_new_tokens: int) -> None: ...
    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool: ...
    def append(self, seq: Sequence, num_new_tokens: int = 1) -> None: ...
    def free(self, seq: Sequence) -> None: ...
    def can_swap_out(self, seq: Sequence) -> bool: ...
    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]: ...
    def can_swap_in(self, seq: Sequence, num_new_tokens: int = 0) -> bool: ...
    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]: ...
    def cache_computed_blocks(self, seq: Sequence) -> None: ...
    def end_step(self) -> None: ...


class HostPool:
    """The host swap tier's free list; blocks read by this step's swap-ins are freed next step."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ConfigError(f"num_host_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # The runner applies swap-outs before swap-ins, so a host block that a swap-in still
        # has to read must not be handed to a swap-out of the same step.
        self._pending_free: list[int] = []

    @property
    def num_free(self) -> int:
        """Host blocks a swap-out can take now."""
        return len(self._free)

    def take(self) -> int:
        """A free host block id."""
        return self._free.popleft()

    def release(self, block_id: int) -> None:
        """Free a host block nobody reads this step."""
        self._free.append(block_id)

    def release_after_step(self, block_id: int) -> None:
        """Free a host block once this step's swap-in copies are done."""
        self._pending_free.append(block_id)

    def end_step(self) -> None:
        """This step's copies are done: pending host blocks become free."""
        self._free.extend(self._pending_free)
        self._pending_free.clear()


class _Block:
    __slots__ = ("block_id", "ref_count", "hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set only while this block is the prefix cache's entry
        self.parent_hash = _NO_PARENT
        self.token_ids: tuple[int, ...] = ()  # kept to reject hash collisions


class BlockManager:
    """Paged KV cache: fixed-size device blocks, prefix sharing, and a host tier for swapping."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        enable_prefix_caching: bool = True,
    ) -> None:
        if num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # no KV worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; LRU first
        self._cached: dict[int, int] = {}  # block hash -> device block id
        self._host = HostPool(num_host_blocks)
        self.num_host_blocks = num_host_blocks

    # -- counts -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Device blocks an allocation can take now (evictable cached blocks included)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_free_host_blocks(self) -> int:
        """Host blocks a swap-out can take now."""
        return self._host.num_free

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the whole device pool can hold."""
        return self.num_blocks * self.block_size

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return math.ceil(num_tokens / self.block_size)

    def ref_count(self, block_id: int) -> int:
        """How many sequences hold device block ``block_id``."""
        return self._blocks[block_id].ref_count

    # -- prefix cache -------------------------------------------------------------------------

    def _lookup(self, parent: int, token_ids: tuple[int, ...]) -> tuple[int, int | None]:
        """(hash, cached block id or None) for one full block."""
        h = hash_block(parent, token_ids)
        block_id = self._cached.get(h)
        if block_id is not None:
            block = self._blocks[block_id]
            if block.token_ids != token_ids or block.parent_hash != parent:
                block_id = None  # a hash collision, not the same prefix
        return h, block_id

    def _prefix_hits(self, seq: Sequence) -> list[tuple[int, int]]:
        """(hash, block id) of the longest cached run of full blocks at the start of ``seq``."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        # Never the block holding the last token: the model must compute at least one token
        # to produce the logits the next sample is drawn from.
        max_hit_blocks = (seq.num_tokens - 1) // bs
        if seq.needs_prompt_logits:  # prompt logprobs: cached positions would give no logits
            max_hit_blocks = min(max_hit_blocks, seq.num_prompt_logits_done // bs)
        hits: list[tuple[int, int]] = []
        parent = _NO_PARENT
        for i in range(max_hit_blocks):
            h, block_id = self._lookup(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            if block_id is None:
                break
            hits.append((h, block_id))
            parent = h
        return hits

    def _register(self, block_id: int, h: int, parent: int, token_ids: tuple[int, ...]) -> None:
        if h in self._cached:
            return  # an equal block is already cached; this one stays private
        block = self._blocks[block_id]
        block.hash, block.parent_hash, block.token_ids = h, parent, token_ids
        self._cached[h] = block_id

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Hash the full blocks whose KV is now computed, making them shareable."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else _NO_PARENT
            token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, token_ids)
            seq.block_hashes.append(h)
            self._register(seq.block_table[i], h, parent, token_ids)

    def cached_block_hashes(self, limit: int) -> list[int]:
        """Hashes of up to ``limit`` blocks in the prefix cache, the most useful first.

        For a router's summary (prefix_summary.py): blocks some sequence holds come first (they
        cannot be evicted), then evictable ones from the most recently freed (evicted last).
        """
        if not self.enable_prefix_caching or limit <= 0:
            return []
        held = [h for h, b in self._cached.items() if self._blocks[b].ref_count > 0]
        if len(held) >= limit:
            return held[:limit]
        evictable = (self._blocks[b].hash for b in reversed(self._evictable))
        return held + [h for h in itertools.islice(evictable, limit - len(held)) if h is not None]

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the prefix cache holds now (in use or evictable)."""
        return len(self._cached)

    def num_prefix_hit_tokens(self, seq: Sequence) -> int:
        """Tokens a new (blockless) sequence would get from the prefix cache on allocate."""
        if seq.block_table or seq.host_block_table:
            return 0
        return len(self._prefix_hits(seq)) * self.block_size

    # -- block pool ---------------------------------------------------------------------------

    def _take_free(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            block = self._blocks[block_id]
            del self._cached[block.hash]
            block.hash, block.parent_hash, block.token_ids = None, _NO_PARENT, ()
        else:
            raise RuntimeError("out of KV cache blocks: check can_allocate/can_append first")
        self._blocks[block_id].ref_count = 1
        return block_id

    def _share(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None:
                self._evictable[block_id] = None  # most recently freed: evicted last
            else:
                self._free.append(block_id)

    def _release_all(self, block_ids: list[int]) -> None:
        # Tail first, so that a sequence's later blocks are evicted before its shared prefix.
        for block_id in reversed(block_ids):
            self._release(block_id)
        block_ids.clear()

    def _swap_in_plan(self, seq: Sequence) -> list[int | None]:
        """Per host block: a cached device block holding the same KV, or None (copy needed)."""
        plan: list[int | None] = [None] * len(seq.host_block_table)
        if not self.enable_prefix_caching:
            return plan
        bs = self.block_size
        for i in range(min(len(seq.block_hashes), len(plan))):
            parent = seq.block_hashes[i - 1] if i else _NO_PARENT
            _, plan[i] = self._lookup(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
        return plan

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free device blocks that room for ``num_new_tokens`` more tokens would consume."""
        if seq.host_block_table:  # swapped: restore, then grow
            plan = self._swap_in_plan(seq)
            restore = sum(1 for b in plan if b is None or self._blocks[b].ref_count == 0)
            total = self.num_blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
            return restore + max(0, total - len(plan))
        if not seq.block_table:  # new or recomputing: prefix hits, then fresh blocks
            hits = self._prefix_hits(seq)
            revived = sum(1 for _, b in hits if self._blocks[b].ref_count == 0)
            total = self.num_blocks_for_tokens(len(hits) * self.block_size + num_new_tokens)
            return revived + total - len(hits)
        total = self.num_blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def num_reclaimable_blocks(self, seqs: Iterable[Sequence]) -> int:
        """Device blocks that would become free if all of ``seqs`` released theirs."""
        held = Counter(b for seq in seqs for b in seq.block_table)
        return sum(1 for b, n in held.items() if n == self._blocks[b].ref_count)

    # -- the paired verbs ---------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether a blockless sequence can get its prefix hits plus ``num_new_tokens`` slots."""
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give a blockless sequence its prefix hits (advancing num_computed_tokens) and slots."""
        assert not seq.block_table and not seq.host_block_table and seq.num_computed_tokens == 0
        if not self.can_allocate(seq, num_new_tokens):
            raise RuntimeError(f"cannot allocate {num_new_tokens} tokens for sequence {seq.seq_id}")
        hits = self._prefix_hits(seq)
        for h, block_id in hits:  # take the hits before any eviction could reclaim them
            self._share(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.append(seq, num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        """Whether a resident sequence can grow by ``num_new_tokens`` slots."""
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Grow the block table to hold num_computed_tokens + ``num_new_tokens`` tokens."""
        total = self.num_blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
        if total - len(seq.block_table) > self.num_free_blocks:
            raise RuntimeError(f"cannot append {num_new_tokens} tokens for sequence {seq.seq_id}")
        while len(seq.block_table) < total:
            seq.block_table.append(self._take_free())

    def free(self, seq: Sequence) -> None:
        """Release every device and host block of ``seq``; its KV is gone (0 computed tokens)."""
        self._release_all(seq.block_table)
        for host_block in seq.host_block_table:
            self._host.release(host_block)
        seq.host_block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    def can_swap_out(self, seq: Sequence) -> bool:
        """Whether the host tier has room for the computed KV of resident ``seq``."""
        num_used = self.num_blocks_for_tokens(seq.num_computed_tokens)
        return bool(seq.block_table) and 0 < num_used <= self.num_free_host_blocks

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move ``seq``'s KV to the host tier; returns (device block, host block) copies."""
        if not self.can_swap_out(seq):
            raise RuntimeError(f"cannot swap out sequence {seq.seq_id}")
        num_used = self.num_blocks_for_tokens(seq.num_computed_tokens)
        pairs = []
        for block_id in seq.block_table[:num_used]:
            host_block = self._host.take()
            pairs.append((block_id, host_block))
            seq.host_block_table.append(host_block)
        # Hashed blocks stay in the prefix cache: a quick swap-in may find them still there.
        self._release_all(seq.block_table)
        return pairs

    def can_swap_in(self, seq: Sequence, num_new_tokens: int = 0) -> bool:
        """Whether swapped ``seq`` fits back on the device with ``num_new_tokens`` more slots."""
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move ``seq``'s KV back to the device; returns (host block, device block) copies."""
        if not seq.host_block_table or not self.can_swap_in(seq):
            raise RuntimeError(f"cannot swap in sequence {seq.seq_id}")
        plan = self._swap_in_plan(seq)
        for block_id in plan:  # share cached blocks before fresh allocations could evict them
            if block_id is not None:
                self._share(block_id)
        bs = self.block_size
        pairs = []
        for i, (host_block, block_id) in enumerate(zip(seq.host_block_table, plan)):
            if block_id is None:
                block_id = self._take_free()
                pairs.append((host_block, block_id))
                if self.enable_prefix_caching and i < len(seq.block_hashes):
                    parent = seq.block_hashes[i - 1] if i else _NO_PARENT
                    token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                    self._register(block_id, seq.block_hashes[i], parent, token_ids)
            seq.block_table.append(block_id)
            self._host.release_after_step(host_block)
        seq.host_block_table.clear()
        return pairs

    def end_step(self) -> None:
        """The runner applied this step's swap copies: host blocks read by swap-ins are free."""
        self._host.end_step()
