"""ModelRunner: vectorised step inputs, swap copies of whole blocks / state slots, profiling."""

from __future__ import annotations

import random

import pytest
import torch
from model_helpers import tiny_model

from fastserve_ray.engine import ModelRunner, ScheduledSequence, SchedulerOutput, Sequence
from fastserve_ray.models.cache import build_cache_context


def _batch(rng: random.Random, block_size: int, num_blocks: int, decode_only: bool = False):
    """Random chunks of sequences with shuffled, non-contiguous block tables; with
    ``decode_only`` every item is one sampled token (the runner's decode fast path)."""
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    items, seqs = [], []
    for _ in range(5):
        total = rng.randint(1, 40)
        seq = Sequence([rng.randrange(512) for _ in range(total)])
        cached = rng.randint(0, total - 1)
        new = 1 if decode_only else rng.randint(1, total - cached)
        seq.block_table = [pool.pop() for _ in range(-(-(cached + new) // block_size))]
        sample = decode_only or rng.random() < 0.6
        items.append(ScheduledSequence(seq.seq_id, cached, new, new > 1, sample))
        seqs.append(seq)
    return SchedulerOutput(scheduled=items), seqs


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_prepare_input_matches_the_reference_context_builder(seed, decode_only):
    rng = random.Random(seed)
    runner = ModelRunner(tiny_model("tiny"), num_blocks=64, block_size=4)
    out, seqs = _batch(rng, 4, 64, decode_only)
    got = runner.prepare_input(out, seqs)
    items = out.scheduled
    ref = build_cache_context(
        [it.num_computed_tokens for it in items], [it.num_new_tokens for it in items],
        [s.block_table for s in seqs], 4,
    )
    for name in ("positions", "query_start_loc", "seq_lens", "slot_mapping", "block_tables"):
        assert torch.equal(getattr(got.ctx, name), getattr(ref, name)), name
    assert (got.ctx.host_query_lens, got.ctx.host_seq_lens) == (ref.host_query_lens, ref.host_seq_lens)
    assert got.ctx.host_seq_lens == tuple(got.ctx.seq_lens.tolist())
    expected_ids = [t for it, s in zip(items, seqs)
                    for t in s.token_ids[it.num_computed_tokens:][: it.num_new_tokens]]
    assert got.input_ids.tolist() == expected_ids
    ends = ref.query_start_loc[1:] - 1
    assert got.logits_indices.tolist() == [int(ends[i]) for i, it in enumerate(items) if it.is_sample]
    assert got.num_sampled == sum(it.is_sample for it in items) and got.prompt_rows == ()
    logits = runner.execute(got)
    assert logits.shape == (got.num_sampled, 512) and logits.dtype == torch.float32


@pytest.mark.parametrize("preset", ["tiny", "lstm-tiny"])
def test_swap_out_and_in_moves_whole_blocks(preset):
    runner = ModelRunner(tiny_model(preset), num_blocks=6, block_size=4, num_host_blocks=5)
    torch.manual_seed(0)
    runner.cache.copy_(torch.randn_like(runner.cache))
    view, dim = runner._blocks(runner.cache)
    before = [view.select(dim, b).clone() for b in range(6)]
    runner.swap([(1, 4), (3, 0)], [])
    runner.cache.zero_()
    runner.swap([], [(4, 5), (0, 2)])  # back to other device blocks
    view, dim = runner._blocks(runner.cache)
    assert torch.equal(view.select(dim, 5), before[1]) and torch.equal(view.select(dim, 2), before[3])
    assert all(not view.select(dim, b).any() for b in (0, 1, 3, 4))  # nothing else was touched


def test_profile_prefill_times_each_length_that_fits():
    runner = ModelRunner(tiny_model("tiny"), num_blocks=8, block_size=4)  # 32 tokens of KV
    table = runner.profile_prefill([1, 16, 32, 64])
    assert sorted(table) == [1, 16, 32] and all(t > 0 for t in table.values())
    recurrent = ModelRunner(tiny_model("gru-tiny"), num_blocks=1, block_size=4)
    assert sorted(recurrent.profile_prefill([1, 300])) == [1, 300]  # a state slot has no limit
