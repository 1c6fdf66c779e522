"""Block accounting, prefix sharing, swap round trips and recurrent state slots."""

import pytest

from fastserve_ray.engine import BlockManager, Sequence, StateSlotManager
from fastserve_ray.engine import block_manager as block_manager_module
from fastserve_ray.errors import ConfigError


def computed(bm: BlockManager, seq: Sequence, num_new: int) -> None:
    """What postprocess does once the runner computed ``num_new`` tokens."""
    seq.num_computed_tokens += num_new
    bm.cache_computed_blocks(seq)


def prefill(bm: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence allocated and fully computed (prefix hits taken)."""
    seq = Sequence(tokens)
    num_new = seq.num_tokens - bm.num_prefix_hit_tokens(seq)
    bm.allocate(seq, num_new)
    computed(bm, seq, num_new)
    return seq


@pytest.mark.parametrize(
    ("args", "needle"),
    [((0, 4), "num_blocks must be >= 1, got 0"), ((4, 0), "block_size must be >= 1, got 0"),
     ((4, 4, -1), "num_host_blocks must be >= 0, got -1")],
)
def test_bad_sizes_are_config_errors(args, needle):
    with pytest.raises(ConfigError, match=needle):
        BlockManager(*args)


def test_allocate_append_free_accounting():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    seq = Sequence(list(range(10)))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    computed(bm, seq, 10)
    for num_tokens in (11, 12):  # the third block fills up without a new one
        seq.append_token(1)
        assert bm.num_blocks_needed(seq, 1) == 0
        bm.append(seq, 1)
        computed(bm, seq, 1)
        assert len(seq.block_table) == 3 and seq.num_tokens == num_tokens
    seq.append_token(1)
    bm.append(seq, 1)
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 4
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == [] and seq.num_computed_tokens == 0


def test_chunked_allocation_grows_per_chunk():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence(list(range(20)))
    bm.allocate(seq, 6)  # first chunk only
    assert len(seq.block_table) == 2
    computed(bm, seq, 6)
    bm.append(seq, 6)
    assert len(seq.block_table) == 3


def test_out_of_blocks_is_reported_not_crashed_into():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = Sequence(list(range(12)))
    assert not bm.can_allocate(seq, 12)
    with pytest.raises(RuntimeError, match="cannot allocate"):
        bm.allocate(seq, 12)
    assert bm.num_free_blocks == 2 and seq.block_table == []


def test_prefix_sharing_refcounts_and_release():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = prefill(bm, list(range(10)))  # blocks [0..3] [4..7] full and hashed, [8, 9] partial
    b = Sequence(list(range(8)) + [50, 51, 52])
    assert bm.num_prefix_hit_tokens(b) == 8
    bm.allocate(b, 3)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 4
    shared = b.block_table[:2]
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16  # cached blocks are free (evictable) ...
    c = Sequence(list(range(9)))
    assert bm.num_prefix_hit_tokens(c) == 8  # ... and still reusable after their owners left
    bm.allocate(c, 1)
    assert c.block_table[:2] == shared
    assert bm.num_free_blocks == 16 - 3


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    prefill(bm, list(range(8)))
    same = Sequence(list(range(8)))  # both blocks cached, but the last token must produce logits
    assert bm.num_prefix_hit_tokens(same) == 4
    bm.allocate(same, 4)
    assert same.num_computed_tokens == 4 and len(same.block_table) == 2
    assert bm.ref_count(same.block_table[1]) == 1  # the block it writes is private


def test_lru_eviction_of_cached_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    old = prefill(bm, list(range(9)))  # 3 blocks, 2 hashed
    bm.free(old)
    assert bm.num_free_blocks == 4
    newer = prefill(bm, [100 + i for i in range(13)])  # needs all 4: evicts the old prefix
    assert bm.num_free_blocks == 0
    bm.free(newer)
    assert bm.num_prefix_hit_tokens(Sequence(list(range(9)))) == 0
    assert bm.num_prefix_hit_tokens(Sequence([100 + i for i in range(13)])) == 12


def test_hash_collisions_do_not_share_blocks(monkeypatch):
    monkeypatch.setattr(block_manager_module, "hash_block", lambda parent, tokens: 0)
    bm = BlockManager(num_blocks=8, block_size=4)
    prefill(bm, [1, 2, 3, 4, 5])
    assert bm.num_prefix_hit_tokens(Sequence([9, 9, 9, 9, 9])) == 0
    assert bm.num_prefix_hit_tokens(Sequence([1, 2, 3, 4, 5])) == 4


def test_prefix_caching_can_be_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    prefill(bm, list(range(9)))
    assert bm.num_prefix_hit_tokens(Sequence(list(range(9)))) == 0


def test_swap_round_trip_restores_table_and_counts():
    bm = BlockManager(num_blocks=8, block_size=4, num_host_blocks=4, enable_prefix_caching=False)
    seq = prefill(bm, list(range(10)))
    device_blocks = list(seq.block_table)
    assert bm.can_swap_out(seq)
    out_pairs = bm.swap_out(seq)
    assert [d for d, _ in out_pairs] == device_blocks
    assert seq.host_block_table == [h for _, h in out_pairs]
    assert seq.block_table == [] and seq.num_computed_tokens == 10
    assert bm.num_free_blocks == 8 and bm.num_free_host_blocks == 1
    assert bm.num_blocks_needed(seq, 1) == 3  # restore 3, the 11th token fits in block 3
    in_pairs = bm.swap_in(seq)
    assert [h for h, _ in in_pairs] == [h for _, h in out_pairs]
    assert seq.block_table == [d for _, d in in_pairs] and seq.host_block_table == []
    assert bm.num_free_host_blocks == 1  # read by this step's copies: freed at end_step
    bm.end_step()
    assert bm.num_free_host_blocks == 4
    bm.free(seq)
    assert bm.num_free_blocks == 8


def test_swap_in_reuses_still_cached_blocks_without_copying():
    bm = BlockManager(num_blocks=8, block_size=4, num_host_blocks=4)
    seq = prefill(bm, list(range(10)))
    hashed = seq.block_table[:2]
    bm.swap_out(seq)
    pairs = bm.swap_in(seq)  # the two full blocks never left the device cache
    assert seq.block_table[:2] == hashed and len(pairs) == 1


def test_swap_in_copies_when_the_cache_was_evicted():
    bm = BlockManager(num_blocks=3, block_size=4, num_host_blocks=4)
    seq = prefill(bm, list(range(10)))
    bm.swap_out(seq)
    other = prefill(bm, [100 + i for i in range(12)])  # takes every device block
    bm.free(other)
    other_hits = bm.num_prefix_hit_tokens(Sequence([100 + i for i in range(12)]))
    assert other_hits == 8
    assert len(bm.swap_in(seq)) == 3


def test_swap_needs_host_room_and_computed_kv():
    bm = BlockManager(num_blocks=8, block_size=4, num_host_blocks=2)
    seq = prefill(bm, list(range(10)))
    assert not bm.can_swap_out(seq)  # 3 blocks, 2 host blocks
    fresh = Sequence([1, 2, 3])
    bm.allocate(fresh, 3)
    assert not bm.can_swap_out(fresh)  # nothing computed: nothing worth keeping


def test_reclaimable_counts_only_blocks_nobody_else_holds():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = prefill(bm, list(range(10)))
    b = prefill(bm, list(range(8)) + [7, 7, 7])
    assert bm.num_reclaimable_blocks([b]) == 1  # the two shared blocks stay with a
    assert bm.num_reclaimable_blocks([a, b]) == 4


def test_state_slots_allocate_free_and_swap():
    sm = StateSlotManager(num_slots=2, num_host_slots=1)
    a, b, c = Sequence([1, 2, 3]), Sequence([4]), Sequence([5])
    sm.allocate(a, 3)
    sm.allocate(b, 1)
    assert not sm.can_allocate(c, 1) and sm.num_free_blocks == 0
    assert sm.can_append(a, 100)  # a state slot holds any length
    a.num_computed_tokens = 3
    slot = a.block_table[0]
    assert sm.swap_out(a) == [(slot, 0)] and sm.num_free_blocks == 1
    assert not sm.can_swap_out(b)  # nothing computed
    sm.allocate(c, 1)
    assert not sm.can_swap_in(a)
    sm.free(c)
    assert sm.swap_in(a) == [(0, a.block_table[0])] and a.num_computed_tokens == 3
    sm.end_step()
    sm.free(a)
    sm.free(b)
    assert sm.num_free_blocks == 2 and sm.num_free_host_blocks == 1
    assert sm.num_prefix_hit_tokens(a) == 0
    with pytest.raises(ConfigError, match="num_slots must be >= 1, got 0"):
        StateSlotManager(0)
