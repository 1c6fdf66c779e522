"""The one-call batch-1 decode layer gives the layer-by-layer path's numbers exactly, runs only
where it applies, and falls back everywhere else."""

from __future__ import annotations

import pytest
import torch

from fastserve_ray.capability import capability
from fastserve_ray.engine import LLMEngine, SamplingParams
from fastserve_ray.kernels.decode_layer import decode_layer_kernel
from fastserve_ray.models import build_model, get_preset
from fastserve_ray.models import llama as llama_module

NO_BF16_KERNEL = (capability().lacks_any("avx512_bf16", "native_kernels")
                  or "the native kernels failed to build")

pytestmark = pytest.mark.skipif(decode_layer_kernel() is None, reason=NO_BF16_KERNEL)

PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)


def _model(**overrides):
    torch.manual_seed(0)
    # Grouped-query heads, q|k|v biases, and a head size (12) that is not a multiple of 16.
    return build_model(get_preset("tiny", dim=48, n_heads=4, n_kv_heads=2, qkv_bias=True, init_std=0.2,
                                  **overrides))


def _generate(model, one_token: bool, calls: list | None = None, monkeypatch=None):
    if not one_token:
        model._one_token_layers = lambda *args, **kwargs: None
    elif calls is not None:
        kernel = decode_layer_kernel()
        monkeypatch.setattr(llama_module, "decode_layer_kernel",
                            lambda: (lambda *a: calls.append(1) or kernel(*a)))
    engine = LLMEngine(model, None, dtype="bfloat16", max_num_seqs=4, block_size=8, num_blocks=64)
    single = engine.generate([[5, 9, 2, 7, 11] * 3], PARAMS)  # batch 1: every decode step
    pair = engine.generate([[3, 4, 5], [8, 1, 2, 6, 9, 10]], PARAMS)  # batch 2: never
    return [(o.token_ids, o.logprobs) for o in single + pair]


def test_batch_one_decode_in_one_call_equals_the_layer_by_layer_path(monkeypatch):
    calls: list = []
    fast = _generate(_model(), True, calls, monkeypatch)
    slow = _generate(_model(), False)
    assert fast == slow  # tokens and logprobs, bit for bit
    layers = get_preset("tiny").n_layers
    # The batch-1 request's 23 decode steps, each layer once; the batch-2 steps never.
    assert len(calls) == 23 * layers


def test_it_applies_only_to_bf16_inference_with_plain_weights():
    model = _model().to(torch.bfloat16).eval()
    assert model._collect_one_token_weights()  # every layer qualifies
    fp32 = _model().eval()
    assert not fp32._collect_one_token_weights()  # fp32 weights: the layer-by-layer path
    model.layers[1].mlp.down_proj = torch.nn.Linear(model.config.ffn_dim, model.config.dim,
                                                    bias=True).to(torch.bfloat16)
    assert model._collect_one_token_weights() == []  # an MLP bias: not for the kernel
    model._one_token_weights = [("stale",)]
    model.to(torch.float32)  # conversion drops the cached weights: they are collected again
    assert model._one_token_weights is None
