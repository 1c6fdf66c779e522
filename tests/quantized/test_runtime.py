"""Quantized linear/RNN modules: every kernel equals F.linear with the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastserve_ray.capability import capability
from fastserve_ray.kernels.small_linear import small_linear_int8_kernel
from fastserve_ray.quantized.autotune import BUCKETS, bucket_of, probe_fused, probe_layer
from fastserve_ray.quantized.fused import QuantizedFusedLinear, fuse_quantized_projections
from fastserve_ray.quantized.linear import KERNELS, QuantizedLinear, kernel_fits
from fastserve_ray.quantized.qtensor import QuantizedWeight
from fastserve_ray.quantized.rnn import QuantizedRNN

NO_BF16_KERNEL = (capability().lacks_any("avx512_bf16", "native_kernels")
                  or "the native kernels failed to build")

# Relative max error vs the dequantized reference: kernels that compute in bf16 (or quantize
# activations) are held to that precision, the fp32 dequantize path to fp32 rounding.
TOL = {("dequant", torch.float32): 1e-5, ("dynamic_int8", torch.float32): 0.05}
BF16_TOL = 0.02


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


SHAPES = [  # (N, K, bits, group_size or None for per-channel)
    (64, 128, 8, None),
    (48, 120, 8, None),  # K % 16 != 0: the int8 op silently computes garbage here
    (48, 136, 8, None),
    (40, 100, 8, None),  # ... and crashes here
    (64, 128, 8, 32),  # group-wise int8: no kernel
    (64, 128, 4, 32),
    (48, 192, 4, 64),
    (50, 96, 4, 32),  # N % 16 != 0: no int4 kernel
    (32, 96, 4, 48),  # group 48: no int4 kernel
    (64, 128, 3, 64),
]


@pytest.mark.parametrize(("n", "k", "bits", "g"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_fitting_kernel_matches_dequantized_linear(n, k, bits, g, dtype):
    torch.manual_seed(n + k + bits)
    qw = QuantizedWeight.from_float(torch.randn(n, k), bits, g)
    bias = torch.randn(n)
    layer = QuantizedLinear(qw, bias, kernels=KERNELS)
    x = torch.randn(3, 5, k).to(dtype)
    ref = F.linear(x.float(), qw.dequantize(torch.float32), bias)
    for name in layer.available:
        y = layer.run_kernel(name, x.reshape(-1, k)).view(3, 5, n)
        assert y.dtype == dtype
        tol = TOL.get((name, dtype), BF16_TOL if name != "dynamic_int8" else 0.05)
        assert rel_err(y, ref) <= tol, name
    y = layer(x)  # the probed plan
    assert y.dtype == dtype and y.shape == (3, 5, n)
    assert rel_err(y, ref) <= (0.05 if "dynamic_int8" in layer.plans[dtype] else BF16_TOL)
    assert torch.equal(layer.int_weight(), qw.q)  # the stored layout holds q exactly


def test_int8_kernel_is_guarded_off_the_shapes_it_gets_wrong():
    cpu = torch.device("cpu")
    assert kernel_fits("int8pack", 8, 128, 64, 128, cpu)
    for k in (100, 120, 136):
        assert not kernel_fits("int8pack", 8, k, 64, k, cpu)
        layer = QuantizedLinear(QuantizedWeight.from_float(torch.randn(48, k), 8))
        assert "int8pack" not in layer.available
        plan = layer.plan_for(torch.bfloat16)
        assert len(plan) == len(BUCKETS) and "int8pack" not in plan
        assert set(plan) <= {"dequant", "int8row"}  # int8row handles any K
    assert not kernel_fits("int4pack", 4, 40, 64, 120, cpu)  # group size the op refuses
    assert not kernel_fits("int4pack", 4, 32, 50, 128, cpu)  # N % 16


@pytest.mark.skipif(small_linear_int8_kernel() is None, reason=NO_BF16_KERNEL)
def test_native_int8_row_kernel_fits_per_channel_int8_on_cpu_only():
    cpu = torch.device("cpu")
    assert kernel_fits("int8row", 8, 100, 64, 100, cpu)  # any K, unlike int8pack
    assert not kernel_fits("int8row", 8, 32, 64, 128, cpu)  # group-wise scales
    assert not kernel_fits("int8row", 4, 128, 64, 128, cpu)
    layer = QuantizedLinear(QuantizedWeight.from_float(torch.randn(48, 100), 8), torch.randn(48))
    assert "int8row" in layer.available and layer.storage == "int8"
    x = torch.randn(1, 100)
    ref = F.linear(x, layer.dequantize(torch.float32), layer.bias)
    y = layer.run_kernel("int8row", x)  # fp32 in, fp32 out, computed in bf16
    assert y.dtype == torch.float32 and rel_err(y, ref) <= BF16_TOL


@pytest.mark.skipif(small_linear_int8_kernel() is None, reason=NO_BF16_KERNEL)
@pytest.mark.parametrize("rows", [1, 5])  # one native call; the members one by one
def test_fused_int8_projections_equal_their_members_side_by_side(rows, monkeypatch):
    torch.manual_seed(rows)
    members = [QuantizedLinear(QuantizedWeight.from_float(torch.randn(n, 96), 8)) for n in (96, 32, 32)]
    for m in members:
        m.plans[torch.bfloat16] = ("int8row", "int8pack", "int8pack", "int8pack")
    fused = QuantizedFusedLinear(members)
    fused.plans[torch.bfloat16] = (True, False, False, False)  # as if probed: fused for 1-2 rows
    x = torch.randn(rows, 96).bfloat16()
    expected = torch.cat([m(x) for m in members], dim=-1)
    calls = []
    original = QuantizedLinear.forward
    monkeypatch.setattr(QuantizedLinear, "forward", lambda self, x: calls.append(self) or original(self, x))
    y = fused(x)
    assert torch.equal(y, expected)  # the same kernel, the same numbers
    assert len(calls) == (0 if rows == 1 else 3)  # batch 1: one fused call, no member called
    assert list(fused.state_dict()) == []  # it owns nothing


@pytest.mark.skipif(small_linear_int8_kernel() is None, reason=NO_BF16_KERNEL)
def test_fused_probe_covers_decode_buckets_and_never_picks_a_wrong_result(monkeypatch):
    torch.manual_seed(3)
    members = [QuantizedLinear(QuantizedWeight.from_float(torch.randn(n, 80), 8)) for n in (80, 48)]
    plan = probe_fused(QuantizedFusedLinear(members), torch.bfloat16, repeats=1)
    assert len(plan) == len(BUCKETS) and all(isinstance(p, bool) for p in plan)
    assert plan[2:] == (False, False)  # 32 and 128 rows: the members' own kernels
    good = QuantizedFusedLinear.run_fused
    monkeypatch.setattr(QuantizedFusedLinear, "run_fused", lambda self, x: good(self, x) * 1.5)
    other = [QuantizedLinear(QuantizedWeight.from_float(torch.randn(n, 80), 8)) for n in (64, 48)]
    assert probe_fused(QuantizedFusedLinear(other), torch.bfloat16, repeats=1) == (False,) * len(BUCKETS)


def test_only_int8_per_channel_layers_without_bias_fuse():
    def layer(bits=8, group=None, bias=False, k=64):
        qw = QuantizedWeight.from_float(torch.randn(32, k), bits, group)
        return QuantizedLinear(qw, torch.randn(32) if bias else None)

    can_fuse = small_linear_int8_kernel() is not None
    assert QuantizedFusedLinear.fusable([layer(), layer()]) == can_fuse
    assert not QuantizedFusedLinear.fusable([layer()])  # nothing to fuse
    assert not QuantizedFusedLinear.fusable([layer(), layer(bias=True)])
    assert not QuantizedFusedLinear.fusable([layer(), layer(4, 32)])
    assert not QuantizedFusedLinear.fusable([layer(), layer(k=96)])
    with pytest.raises(ValueError, match="only int8 per-channel"):
        QuantizedFusedLinear([layer(), layer(bias=True)])

    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fused = layer(), layer(), None

        def fusable_linears(self):
            return [(self, "fused", [self.a, self.b])]

    owner = Owner()
    keys = list(owner.state_dict())
    assert fuse_quantized_projections(owner) == int(can_fuse)
    assert list(owner.state_dict()) == keys


def test_probe_rejects_a_kernel_that_computes_the_wrong_result(monkeypatch):
    layer = QuantizedLinear(QuantizedWeight.from_float(torch.randn(64, 96), 8))
    good = QuantizedLinear.run_kernel

    def broken(self, name, x):
        y = good(self, name, x)
        return y * 1.5 if name == "int8pack" else y

    monkeypatch.setattr(QuantizedLinear, "run_kernel", broken)
    assert "int8pack" in layer.available
    assert "int8pack" not in probe_layer(layer, torch.bfloat16, repeats=1)


def test_weights_stay_compressed_in_memory():
    qw8 = QuantizedWeight.from_float(torch.randn(256, 512), 8)
    qw4 = QuantizedWeight.from_float(torch.randn(256, 512), 4, 64)
    dense = 256 * 512 * 4
    assert QuantizedLinear(qw8).memory_bytes() < dense / 3.9
    assert QuantizedLinear(qw4).memory_bytes() < dense / 7
    odd = QuantizedLinear(QuantizedWeight.from_float(torch.randn(40, 512), 4, 64))  # no kernel
    assert odd.storage == "nibbles" and odd.memory_bytes() < 40 * 512 * 4 / 7


def test_buckets_cover_every_batch_size():
    assert [bucket_of(m) for m in (1, 2, 3, 16, 17, 64, 65, 10_000)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_moving_the_model_keeps_fp32_scales():
    layer = QuantizedLinear(QuantizedWeight.from_float(torch.randn(32, 64), 8), torch.randn(32))
    layer.to(torch.bfloat16)
    assert layer.scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert layer.q.dtype == torch.int8


@pytest.mark.parametrize("mode", ["rnn", "lstm", "gru"])
def test_quantized_rnn_matches_torch_rnn_with_dequantized_weights(mode):
    torch.manual_seed(0)
    cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[mode]
    ref = cls(32, 32, num_layers=2, batch_first=True).eval()
    q = QuantizedRNN(mode, 32, 2)
    with torch.no_grad():
        for layer in range(2):
            mods = []
            for kind in ("ih", "hh"):
                w = getattr(ref, f"weight_{kind}_l{layer}")
                qw = QuantizedWeight.from_float(w, 8)
                w.copy_(qw.dequantize())
                mods.append(QuantizedLinear(qw, getattr(ref, f"bias_{kind}_l{layer}").detach(),
                                            kernels=("dequant",)))
            q.add_layer(*mods)
        x = torch.randn(3, 7, 32)
        out_ref, h_ref = ref(x)
        out, h = q(x)
        assert (out - out_ref).abs().max() < 1e-5
        for a, b in zip(h if mode == "lstm" else (h,), h_ref if mode == "lstm" else (h_ref,)):
            assert (a - b).abs().max() < 1e-5
        # Continuing from a state (the engine's decode step) agrees too.
        out2, _ = q(x[:, :1], h)
        out2_ref, _ = ref(x[:, :1], h_ref)
        assert (out2 - out2_ref).abs().max() < 1e-5


def test_a_packed_layout_that_does_not_decode_to_q_is_never_used(monkeypatch):
    monkeypatch.setattr(QuantizedLinear, "_int4pack_holds", lambda self, qw: False)
    qw = QuantizedWeight.from_float(torch.randn(64, 128), 4, 32)
    layer = QuantizedLinear(qw)
    assert layer.storage == "nibbles" and layer.available == ("dequant",)
    assert torch.equal(layer.int_weight(), qw.q)


def test_empty_batch_gives_empty_output():
    layer = QuantizedLinear(QuantizedWeight.from_float(torch.randn(32, 64), 8))
    assert layer(torch.randn(0, 64)).shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.parametrize(("bits", "g"), [(8, None), (4, 64), (4, 128)])
def test_cuda_kernels_match_dequantized_linear(bits, g):
    torch.manual_seed(0)
    qw = QuantizedWeight.from_float(torch.randn(256, 512), bits, g)
    layer = QuantizedLinear(qw, device="cuda")
    assert ("int8pack" if bits == 8 else "int4pack") in layer.available
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(7, 512, device="cuda").to(dtype)
        ref = F.linear(x.float(), qw.dequantize().cuda())
        for name in layer.available:
            assert rel_err(layer.run_kernel(name, x), ref) <= BF16_TOL, name
        assert layer(x).dtype == dtype
    assert torch.equal(layer.int_weight().cpu(), qw.q)
