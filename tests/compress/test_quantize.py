"""Round-to-nearest quantization by hand."""

from __future__ import annotations

import torch

from fastserve_ray.compress.quantize import quantize_int8_per_channel, quantize_rtn


def test_int8_per_channel_scale_is_absmax_over_127() -> None:
    w = torch.tensor([[127.0, -63.5, 0.0], [1.0, 0.5, -2.0]])
    qw = quantize_int8_per_channel(w)
    assert qw.group_size == 3 and qw.scale.shape == (2, 1)
    assert torch.allclose(qw.scale[:, 0], torch.tensor([1.0, 2.0 / 127]))
    assert qw.q[0].tolist() == [127, -64, 0]  # -63.5 rounds half to even
    assert qw.q[1].tolist() == [64, 32, -127]


def test_int4_groups_have_their_own_scales_and_keep_zeros() -> None:
    w = torch.tensor([[7.0, 0.0, 1.0, -3.5, 70.0, -35.0, 0.0, 14.0]])
    qw = quantize_rtn(w, 4, 4)
    assert qw.scale.tolist() == [[1.0, 10.0]]
    assert qw.q.tolist() == [[7, 0, 1, -4, 7, -4, 0, 1]]
    assert qw.dequantize()[0, 1] == 0 and qw.dequantize()[0, 6] == 0


def test_error_shrinks_with_bits() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    err = {b: (quantize_rtn(w, b, 32).dequantize() - w).pow(2).mean().item() for b in (3, 4, 8)}
    assert err[8] < err[4] < err[3]
