"""PackedLinear: oneDNN-packed weights on CPU, the same results and parameters as nn.Linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import make_engine
from torch import nn

from fastserve_ray.engine.packed_linear import PackedLinear, can_pack, pack_linear_weights
from fastserve_ray.models import build_model, get_preset

pytestmark = pytest.mark.skipif(not can_pack(), reason="this torch build has no oneDNN")


class NotPlain(nn.Linear):
    """A subclass (like a compressed layer): packing must leave it alone."""


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("tiny", tie_embeddings=True)).eval().to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
def test_packed_equals_linear_for_any_row_count(dtype, tol):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=True).to(dtype)
    packed = PackedLinear(lin)
    with torch.inference_mode():
        for shape in ((1, 48), (7, 48), (65, 48), (2, 5, 48)):
            x = torch.randn(shape).to(dtype)
            torch.testing.assert_close(packed(x), F.linear(x, lin.weight, lin.bias), atol=tol, rtol=tol)
        assert packed._packed is not None and packed._packed.is_mkldnn


def test_pack_model_keeps_parameters_ties_and_outputs():
    model = _model()
    tokens = torch.randint(0, 512, (1, 12))
    with torch.inference_mode():
        before = model(tokens)
    keys = set(model.state_dict())
    model.layers.append(nn.Module())
    model.layers[-1].custom = NotPlain(4, 4)
    n = pack_linear_weights(model)
    assert n == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + the LM head
    assert type(model.layers[-1].custom) is NotPlain
    del model.layers[-1]
    assert set(model.state_dict()) == keys
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), before, atol=1e-4, rtol=1e-4)


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
        torch.testing.assert_close(lin(xb), F.linear(xb, lin.weight), atol=0, rtol=0)
    lin.float()
    out = lin(x)  # grad enabled and the weight requires grad: autograd's F.linear
    out.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.shape == (8, 16)


def test_the_engine_packs_its_model_on_cpu():
    model = _model(torch.bfloat16)
    engine = make_engine(model)
    assert isinstance(engine.runner.model.layers[0].mlp.up_proj, PackedLinear)
    assert isinstance(engine.runner.model.lm_head, PackedLinear)
