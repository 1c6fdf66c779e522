"""Both forward modes agree: cached incremental decoding == full causal forward."""

import random

import pytest
import torch

from fastserve_ray.models import build_cache_context, build_model, get_preset

VOCAB = 512


def run_incremental(model, tokens: torch.Tensor, block_size: int, seed: int) -> torch.Tensor:
    """Feed each row of ``tokens`` in random-size chunks, interleaving sequences in one batch.

    Blocks are handed out from a shuffled pool so block tables are non-contiguous,
    as they are in the engine's paged cache.
    """
    rng = random.Random(seed)
    B, T = tokens.shape
    blocks_per_seq = -(-T // block_size)
    pool = list(range(B * blocks_per_seq + 3))
    rng.shuffle(pool)
    tables = [pool[i * blocks_per_seq : (i + 1) * blocks_per_seq] for i in range(B)]
    cache = model.allocate_cache(len(pool), block_size, "cpu", torch.float32)
    num_cached = [0] * B
    pieces: list[list[torch.Tensor]] = [[] for _ in range(B)]
    while any(n < T for n in num_cached):
        active = [i for i in range(B) if num_cached[i] < T and rng.random() < 0.8] or [
            next(i for i in range(B) if num_cached[i] < T)
        ]
        new = [min(rng.choice([1, 1, 2, 5, 9]), T - num_cached[i]) for i in active]
        ctx = build_cache_context(
            [num_cached[i] for i in active], new, [tables[i] for i in active], block_size,
            state_slots=[pool[i] for i in active],
        )
        ids = torch.cat([tokens[i, num_cached[i] : num_cached[i] + n] for i, n in zip(active, new)])
        with torch.no_grad():
            logits = model.forward_cached(ids, ctx, cache)
        offset = 0
        for i, n in zip(active, new):
            pieces[i].append(logits[offset : offset + n])
            offset += n
            num_cached[i] += n
    return torch.stack([torch.cat(p) for p in pieces])


@pytest.mark.parametrize("preset", ["tiny", "rnn-tiny", "lstm-tiny", "gru-tiny"])
@pytest.mark.parametrize("seed", [0, 1])
def test_cached_forward_matches_full_forward(preset, seed):
    torch.manual_seed(seed)
    model = build_model(get_preset(preset)).eval()
    tokens = torch.randint(0, VOCAB, (3, 23))
    with torch.no_grad():
        full = model(tokens)
    inc = run_incremental(model, tokens, block_size=4, seed=seed)
    assert inc.shape == full.shape == (3, 23, VOCAB)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_gqa_qkv_bias_untied_variant_matches():
    torch.manual_seed(3)
    cfg = get_preset("tiny", qkv_bias=True, tie_embeddings=False, n_kv_heads=1, rope_theta=500.0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # non-zero biases too
    tokens = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(run_incremental(model, tokens, 8, seed=5), full, atol=1e-5, rtol=1e-5)


def test_logits_indices_and_causality():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    tokens = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        full = model(tokens)
        altered = tokens.clone()
        altered[0, 8:] = (altered[0, 8:] + 1) % VOCAB
        # Changing later tokens must not change earlier logits (the mask is causal).
        torch.testing.assert_close(model(altered)[0, :8], full[0, :8])
        cache = model.allocate_cache(3, 4, "cpu", torch.float32)
        ctx = build_cache_context([0], [12], [[2, 0, 1]], 4)
        last = model.forward_cached(tokens[0], ctx, cache, logits_indices=torch.tensor([11]))
    assert last.shape == (1, VOCAB)
    torch.testing.assert_close(last[0], full[0, 11], atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage():
    model = build_model(get_preset("tiny"))
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = build_model(get_preset("tiny", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_training_forward_backward_reduces_loss():
    """A few optimizer steps on one batch lower the loss: the model is trainable end to end."""
    torch.manual_seed(0)
    for preset in ("tiny", "lstm-tiny"):
        model = build_model(get_preset(preset))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        tokens = torch.randint(0, VOCAB, (4, 33))
        losses = []
        for _ in range(15):
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.5, (preset, losses)


def test_cache_sizes():
    llama = build_model(get_preset("tiny"))
    # 2 layers * (k, v) * 16 tokens * 2 kv heads * 16 head dim * 4 bytes
    assert llama.cache_bytes_per_block(16, torch.float32) == 2 * 2 * 16 * 2 * 16 * 4
    lstm = build_model(get_preset("lstm-tiny"))
    # one slot: (h, c) * 2 layers * 64 dims * 2 bytes, independent of block size
    assert lstm.cache_bytes_per_block(16, torch.bfloat16) == 2 * 2 * 64 * 2
    assert lstm.cache_bytes_per_block(1, torch.bfloat16) == lstm.cache_bytes_per_block(64, torch.bfloat16)
