"""PackedLinear: oneDNN-packed weights on CPU, the same results and parameters as nn.Linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastserve_ray.capability import capability
from fastserve_ray.engine import LLMEngine
from fastserve_ray.kernels import small_linear
from fastserve_ray.layers.packed_linear import (
    PackedFusedLinear,
    PackedLinear,
    can_pack,
    pack_linear_weights,
)
from fastserve_ray.models import build_model, get_preset

pytestmark = pytest.mark.skipif(not can_pack(), reason="this torch build has no oneDNN")
FEW_ROWS_KERNEL = small_linear.small_linear_kernel() is not None
# bf16 is packed where oneDNN can (AVX-512 BW/VL/DQ); elsewhere the same modules take F.linear.
BF16_PACKS = can_pack(torch.bfloat16)


def _few_rows(dtype: torch.dtype, rows: int) -> bool:
    return FEW_ROWS_KERNEL and dtype == torch.bfloat16 and rows <= small_linear.MAX_ROWS


def _packs(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or BF16_PACKS
BF16_ROUNDING = dict(rtol=2**-7, atol=1e-3)  # another fp32 summation order, one bf16 rounding


def _tolerance(dtype: torch.dtype, rows: int) -> dict:
    """oneDNN's packed product equals F.linear exactly in bf16; the few-rows kernel sums in
    another order."""
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    return BF16_ROUNDING if _few_rows(dtype, rows) else dict(atol=0, rtol=0)


class NotPlain(nn.Linear):
    """A subclass (like a compressed layer): packing must leave it alone."""


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("tiny", tie_embeddings=True)).eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_linear_for_any_row_count(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=True).to(dtype)
    packed = PackedLinear(lin)
    with torch.inference_mode():
        for shape in ((1, 48), (3, 48), (7, 48), (65, 48), (2, 5, 48)):
            x = torch.randn(shape).to(dtype)
            want = F.linear(x.float(), lin.weight.float(), lin.bias.float()).to(dtype)
            rows = x.numel() // 48
            torch.testing.assert_close(packed(x), want if _few_rows(dtype, rows) else
                                       F.linear(x, lin.weight, lin.bias), **_tolerance(dtype, rows))
        if _packs(dtype):
            assert packed._packed is not None and packed._packed.is_mkldnn
        else:  # this CPU cannot pack bf16: nothing was packed, and nothing raised
            assert packed._packed is None


def test_pack_model_keeps_parameters_ties_and_outputs():
    model = _model()
    tokens = torch.randint(0, 512, (1, 12))
    with torch.inference_mode():
        before = model(tokens)
    keys = set(model.state_dict())
    model.extra = nn.Module()
    model.extra.custom = NotPlain(4, 4)
    n = pack_linear_weights(model)
    # per layer: q|k|v fused, o, gate|up fused, down; plus the LM head
    assert n == 2 * 4 + 1
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert isinstance(attn.fused_qkv, PackedFusedLinear) and isinstance(mlp.fused_gate_up, PackedFusedLinear)
    assert type(attn.q_proj) is nn.Linear and isinstance(attn.o_proj, PackedLinear)  # fused ones stay
    assert type(model.extra.custom) is NotPlain
    del model.extra
    assert set(model.state_dict()) == keys  # the fused modules own no parameters
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [2, 5])  # the few-rows kernel, oneDNN's packed product
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_the_members_side_by_side(dtype, rows):
    torch.manual_seed(0)
    members = [nn.Linear(32, 16, bias=True), nn.Linear(32, 8, bias=False), nn.Linear(32, 8, bias=True)]
    members = [m.to(dtype) for m in members]
    fused = PackedFusedLinear(members)
    x = torch.randn(rows, 32).to(dtype)
    tol = _tolerance(dtype, rows)
    want = torch.cat([F.linear(x, m.weight, m.bias) for m in members], dim=-1)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), want, **tol)
        assert (fused._cache.packed is not None) == _packs(dtype)
        with torch.no_grad():
            members[1].weight.add_(1.0)  # one member changes: the product follows
        want = torch.cat([F.linear(x, m.weight, m.bias) for m in members], dim=-1)
        torch.testing.assert_close(fused(x), want, **tol)
    assert list(fused.parameters()) == []
    with pytest.raises(ValueError, match="share their input size"):
        PackedFusedLinear([nn.Linear(4, 2), nn.Linear(5, 2)])


def test_a_changed_weight_is_repacked_and_training_takes_f_linear():
    torch.manual_seed(0)
    lin = PackedLinear(nn.Linear(16, 8, bias=False))
    x = torch.randn(3, 16)
    with torch.inference_mode():
        lin(x)
    first = lin._packed
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place: a new version of the same storage
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
    assert lin._packed is not first
    lin.to(torch.bfloat16)  # new storage and dtype
    with torch.inference_mode():
        xb = x.bfloat16()
        torch.testing.assert_close(lin(xb), F.linear(xb, lin.weight), **_tolerance(torch.bfloat16, 3))
    lin.float()
    out = lin(x)  # grad enabled and the weight requires grad: autograd's F.linear
    out.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.shape == (8, 16)


@pytest.mark.parametrize("dtype", [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not BF16_PACKS, reason=str(capability().lacks("onednn_bf16")))),
])
def test_the_engine_packs_its_model_on_cpu(dtype):
    model = _model(dtype)
    engine = LLMEngine(model, None, num_blocks=32)
    assert isinstance(engine.runner.model.layers[0].mlp.fused_gate_up, PackedFusedLinear)
    assert isinstance(engine.runner.model.layers[0].mlp.down_proj, PackedLinear)
    assert isinstance(engine.runner.model.lm_head, PackedLinear)


def test_fused_bias_is_concatenated_once_and_follows_changes():
    torch.manual_seed(0)
    members = [nn.Linear(16, 8, bias=True), nn.Linear(16, 4, bias=False)]
    fused = PackedFusedLinear(members)
    x = torch.randn(2, 16)
    with torch.inference_mode():
        fused(x)
        first = fused._bias_cat
        fused(x)
        assert fused._bias_cat is first  # not rebuilt per call
        with torch.no_grad():
            members[0].bias.add_(1.0)
        want = torch.cat([F.linear(x, m.weight, m.bias) for m in members], dim=-1)
        torch.testing.assert_close(fused(x), want, atol=1e-5, rtol=1e-5)
    assert fused._bias_cat is not first


@pytest.mark.skipif(not FEW_ROWS_KERNEL, reason=capability().lacks_any("avx512_bf16", "native_kernels")
                    or "the native kernels failed to build")
def test_few_bf16_rows_go_to_the_native_kernel_and_more_rows_to_onednn(monkeypatch):
    calls = []
    real = small_linear.small_linear_kernel()

    def counting(x, weights, biases, out):
        calls.append((x.shape[0], len(weights)))
        return real(x, weights, biases, out)

    monkeypatch.setattr(small_linear, "small_linear_kernel", lambda: counting)
    torch.manual_seed(0)
    lin = PackedLinear(nn.Linear(64, 40).bfloat16())
    fused = PackedFusedLinear([nn.Linear(64, 24).bfloat16(), nn.Linear(64, 8, bias=False).bfloat16()])
    with torch.inference_mode():
        for rows in (1, small_linear.MAX_ROWS, small_linear.MAX_ROWS + 1, 64):
            x = torch.randn(rows, 64).bfloat16()
            assert lin(x).shape == (rows, 40) and fused(x).shape == (rows, 32)
    assert calls == [(1, 1), (1, 2), (small_linear.MAX_ROWS, 1), (small_linear.MAX_ROWS, 2)]
