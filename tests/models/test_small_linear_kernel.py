"""The native few-rows bf16 linear equals an fp32 reference up to bf16 rounding of its output."""

from __future__ import annotations

import pytest
import torch

from fastserve_ray.capability import capability
from fastserve_ray.kernels.small_linear import small_linear_int8_kernel, small_linear_kernel

NO_BF16_KERNEL = (capability().lacks_any("avx512_bf16", "native_kernels")
                  or "the native kernels failed to build")

kernel = small_linear_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason=NO_BF16_KERNEL)


def _reference(x, weights, biases):
    outs = []
    for w, b in zip(weights, biases):
        y = x.float() @ w.float().T
        outs.append(y if b is None else y + b.float())
    return torch.cat(outs, dim=-1)


def _assert_rounded_from(out, ref):
    # fp32 sums in another order, then one rounding to bf16 (8 bits of mantissa).
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6])  # every row tile, and two passes of 4
@pytest.mark.parametrize("k", [32, 37, 100, 512])  # a multiple of 32, and masked tails
def test_one_weight_any_tail(rows, k):
    torch.manual_seed(rows * 1000 + k)
    n = 83  # not a multiple of the 4-row tile
    x = torch.randn(rows, k).bfloat16()
    w = (torch.randn(n, k) / k**0.5).bfloat16()
    b = torch.randn(n).bfloat16()
    out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16)
    kernel(x, [w], [b], out)
    _assert_rounded_from(out, _reference(x, [w], [b]))


@pytest.mark.parametrize("rows", [1, 3])  # the one-row path and the tiles
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_weights_land_side_by_side_on_any_thread_count(threads, rows):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(threads)
        k = 96
        weights = [(torch.randn(n, k) / k**0.5).bfloat16() for n in (130, 7, 256)]
        biases = [torch.randn(130).bfloat16(), None, torch.randn(256).bfloat16()]
        x = torch.randn(rows, k).bfloat16()
        out = torch.empty(rows, 393, dtype=torch.bfloat16)
        kernel(x, weights, biases, out)
        _assert_rounded_from(out, _reference(x, weights, biases))
    finally:
        torch.set_num_threads(before)


def test_strided_rows_in_and_out():
    torch.manual_seed(1)
    wide_x = torch.randn(2, 80).bfloat16()
    x = wide_x[:, :64]  # rows 80 apart
    w = torch.randn(40, 64).bfloat16()
    wide_out = torch.zeros(2, 50, dtype=torch.bfloat16)
    kernel(x, [w], [None], wide_out[:, 5:45])
    _assert_rounded_from(wide_out[:, 5:45], _reference(x, [w], [None]))
    assert wide_out[:, :5].eq(0).all() and wide_out[:, 45:].eq(0).all()  # nothing outside


def test_bad_arguments_name_the_problem():
    x = torch.randn(1, 16).bfloat16()
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match="x must be a CPU bf16"):
        kernel(x.float(), [w], [None], torch.empty(1, 8))
    with pytest.raises(RuntimeError, match="out has 9 columns, the weights 8"):
        kernel(x, [w], [None], torch.empty(1, 9, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="weights must be contiguous bf16"):
        kernel(x, [w.T.contiguous().T], [None], torch.empty(1, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="one bias"):
        kernel(x, [w], [], torch.empty(1, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("k", [37, 100, 512])  # the one-row path: 16-wide steps, 64-wide, tails
def test_int8_weights_are_widened_exactly_and_scaled_per_row(rows, k):
    int8_kernel = small_linear_int8_kernel()
    torch.manual_seed(rows + k)
    n = 83
    x = torch.randn(rows, k).bfloat16()
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)  # the extremes included
    q[0, 0], q[1, 0] = -128, 127
    scale = torch.rand(n) / 100 + 1e-4
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    int8_kernel(x, [q], [scale], out)
    _assert_rounded_from(out, (x.float() @ q.float().T) * scale)


def test_int8_fused_weights_land_side_by_side():
    int8_kernel = small_linear_int8_kernel()
    torch.manual_seed(7)
    k = 96
    qs = [torch.randint(-128, 128, (n, k), dtype=torch.int8) for n in (130, 7, 256)]
    scales = [torch.rand(q.shape[0]) / 100 + 1e-4 for q in qs]
    x = torch.randn(1, k).bfloat16()
    out = torch.empty(1, 393, dtype=torch.bfloat16)
    int8_kernel(x, qs, scales, out)
    ref = torch.cat([(x.float() @ q.float().T) * s for q, s in zip(qs, scales)], dim=-1)
    _assert_rounded_from(out, ref)


def test_int8_bad_arguments_name_the_problem():
    int8_kernel = small_linear_int8_kernel()
    x = torch.randn(1, 16).bfloat16()
    q = torch.zeros(8, 16, dtype=torch.int8)
    out = torch.empty(1, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="q must be a contiguous int8"):
        int8_kernel(x, [q.float()], [torch.ones(8)], out)
    with pytest.raises(RuntimeError, match="scale must be a contiguous fp32"):
        int8_kernel(x, [q], [torch.ones(8, dtype=torch.bfloat16)], out)
    with pytest.raises(RuntimeError, match="out must be bf16"):
        int8_kernel(x, [q], [torch.ones(8)], torch.empty(1, 8))
    with pytest.raises(RuntimeError, match="out has 9 columns, the weights 8"):
        int8_kernel(x, [q], [torch.ones(8)], torch.empty(1, 9, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="one scale per weight"):
        int8_kernel(x, [q, q], [torch.ones(8)], out)
