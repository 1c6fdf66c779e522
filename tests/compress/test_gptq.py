"""GPTQ: exact on identity-like Hessians, better than round-to-nearest on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from fastserve_ray.compress.gptq import gptq_quantize, hessian_from_gram
from fastserve_ray.compress.quantize import quantize_rtn


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k // 4, generator=g)
    mix = torch.randn(k // 4, k, generator=g)
    return base @ mix + 0.1 * torch.randn(n, k, generator=g)


def test_diagonal_hessian_equals_round_to_nearest() -> None:
    # With uncorrelated inputs there is no other column to push the error onto.
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    qw = gptq_quantize(w, torch.eye(32) * 2.0, 4, 8, block_size=16, dampening_frac=0.01)
    ref = quantize_rtn(w, 4, 8)
    assert torch.equal(qw.q, ref.q) and torch.allclose(qw.scale, ref.scale)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_layer_output(bits: int) -> None:
    torch.manual_seed(1)
    k = 64
    x = _correlated_inputs(512, k)
    w = torch.randn(32, k)
    h = hessian_from_gram(x.T @ x, x.shape[0])
    q_gptq = gptq_quantize(w, h, bits, 16, block_size=32)
    q_rtn = quantize_rtn(w, bits, 16)
    err = lambda q: (x @ (q.dequantize() - w).T).pow(2).mean().item()  # noqa: E731
    assert err(q_gptq) < 0.8 * err(q_rtn)


def test_keep_zeros_preserves_the_mask_and_dead_inputs_are_zeroed() -> None:
    torch.manual_seed(2)
    x = _correlated_inputs(256, 32)
    x[:, 5] = 0.0  # an input that is never active
    w = torch.randn(8, 32)
    w[:, ::2] = 0.0
    qw = gptq_quantize(w, hessian_from_gram(x.T @ x, 256), 4, 16, keep_zeros=True)
    assert (qw.q[:, ::2] == 0).all() and (qw.q[:, 5] == 0).all()
    assert qw.bits == 4 and qw.scale.shape == (8, 2)
