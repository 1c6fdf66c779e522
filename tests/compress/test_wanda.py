"""Wanda's score end to end: calibration statistics -> input norms -> per-row masks.

The Wanda paper (Sun et al. 2023) scores W[i, j] by |W[i, j]| * ||X_j||_2, where X_j is input
feature j over *all* calibration tokens, and compares scores within each output row i. Each test
here is built so that one plausible mistake (L1 or mean instead of L2, one batch instead of all,
per layer instead of per row, no activations at all) gives a different mask.
"""

from __future__ import annotations

import torch

from fastserve_ray.compress.calibration import ROW_BATCH, block_statistics
from fastserve_ray.compress.prune import magnitude_prune, wanda_prune
from fastserve_ray.compress.recipe import LayerPlan, PruneSpec
from fastserve_ray.compress.stages import compress_weight
from fastserve_ray.compress.tasks import merge_stats
from fastserve_ray.models import get_preset
from fastserve_ray.models.llama import DecoderLayer


def _wanda_plan(shape: tuple[int, int], sparsity: float = 0.5) -> LayerPlan:
    spec = PruneSpec("wanda", sparsity, "unstructured", "layer", ("Linear",), (), "test")
    return LayerPlan("layer.weight", shape, 0, prune=spec)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What calibration hands a layer: the Gram matrix X^T X of its inputs and the token count."""
    x64 = x.to(torch.float64)
    return (x64.T @ x64).to(torch.float32), x.shape[0]


def test_a_loud_input_channel_keeps_its_small_weights() -> None:
    # 64 tokens; channel 2 carries activations 100x larger than the others (an "outlier feature").
    x = torch.ones(64, 4)
    x[:, 2] = 100.0
    w = torch.tensor([[1.0, 2.0, 0.05, 3.0], [-2.0, 1.0, -0.05, 0.5]])
    out = compress_weight(w, _wanda_plan((2, 4)), _stats(x))
    # ||X_j|| = 8, 8, 800, 8: scores row 0 = 8, 16, 40, 24; row 1 = 16, 8, 40, 4.
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.05, 3.0], [-2.0, 0.0, -0.05, 0.0]]))
    assert magnitude_prune(w, 0.5)[:, 2].tolist() == [0.0, 0.0]  # magnitude alone drops them


def test_input_norm_is_l2_over_all_tokens() -> None:
    # Channel 0: one spike (L2 10, L1 10); channel 1: steady (L2 8, L1 16); channel 2: alternating
    # sign (L2 10, mean 0); channel 3: silent. Row 0 has equal weights, so only the norms decide:
    # L2 keeps 0 and 2 (an L1 score would keep 1, a signed mean would drop 2). Row 1 scores
    # 7, 8, 10, 0 with the L2 norm but 70, 64, 100, 0 with the squared norm (diag X^T X unrooted).
    x = torch.tensor([[10.0, 4.0, 5.0, 0.0],
                      [0.0, 4.0, -5.0, 0.0],
                      [0.0, 4.0, 5.0, 0.0],
                      [0.0, 4.0, -5.0, 0.0]])
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.7, 1.0, 1.0, 5.0]])
    kept = compress_weight(w, _wanda_plan((2, 4)), _stats(x)) != 0
    assert kept.tolist() == [[True, False, True, False], [False, True, True, False]]


def test_scores_are_compared_within_each_output_row() -> None:
    # Row 0's weights are all 100x smaller than row 1's: a per-layer comparison would empty row 0.
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [10.0, 20.0, 30.0, 40.0]])
    out = wanda_prune(w, torch.ones(4), 0.5)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.3, 0.4], [0.0, 0.0, 30.0, 40.0]]))


def test_block_statistics_accumulate_every_batch_and_chunks_add_up() -> None:
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    layer = DecoderLayer(cfg)
    state = {k: v.detach() for k, v in layer.state_dict().items()}
    rows, seq = 2 * ROW_BATCH + 3, 5  # three forward batches, the last one partial
    hidden = torch.randn(rows, seq, cfg.dim)
    hidden[-1] *= 50.0  # a loud last row: a norm that misses the last batch is far off
    stats, _ = block_statistics(cfg, state, hidden)
    gram, count = stats["self_attn.q_proj.weight"]
    assert count == rows * seq
    with torch.no_grad():
        q_in = layer.input_layernorm(hidden).reshape(-1, cfg.dim).to(torch.float64)
    expected = (q_in * q_in).sum(0)  # ||X_j||^2 over all tokens
    assert torch.allclose(torch.diagonal(gram).to(torch.float64), expected, rtol=1e-5)
    assert all(n == rows * seq for _, n in stats.values())

    # The task graph computes statistics per chunk of rows and sums them: same Gram, same count.
    split = ROW_BATCH
    parts = [block_statistics(cfg, state, h)[0]["self_attn.q_proj.weight"]
             for h in (hidden[:split], hidden[split:])]
    merged = merge_stats(tuple((g.numpy(), n) for g, n in parts))
    assert merged is not None and merged[1] == count
    assert torch.allclose(merged[0], gram, rtol=1e-6, atol=1e-4)
