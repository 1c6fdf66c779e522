"""Engine dtype: auto detection, explicit bf16 (greedy-equal to a bf16 reference), fp32 RoPE."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_engine

from fastserve_ray import device as device_mod
from fastserve_ray.engine import EngineConfig, LLMEngine, SamplingParams
from fastserve_ray.errors import ConfigError
from fastserve_ray.models import build_model, get_preset


def _fresh_model(preset: str = "tiny") -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model(get_preset(preset, init_std=0.2)).eval()


def test_auto_dtype_follows_the_device_and_cpu_features(monkeypatch):
    assert device_mod.default_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: True)
    assert device_mod.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: False)
    assert device_mod.resolve_dtype("auto", "cpu") == torch.float32
    assert device_mod.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="engine.dtype .* got 'float16'"):
        EngineConfig(dtype="float16")
    assert EngineConfig.from_dict({"dtype": "bfloat16"}).dtype == "bfloat16"


@torch.no_grad()
def assert_near_greedy(model, prompt: list[int], tokens: list[int], tol: float = 0.05) -> None:
    """Each token is the bf16 reference's argmax on the same prefix, or ties it within ``tol``.

    Teacher-forced on the engine's own tokens, so one bf16 near-tie (two logits that round
    together) does not turn every later token into a mismatch.
    """
    exact = 0
    for i, tok in enumerate(tokens):
        logits = model(torch.tensor([prompt + tokens[:i]]))[0, -1].float()
        assert logits.max() - logits[tok] <= tol, (i, tok, int(logits.argmax()))
        exact += tok == int(logits.argmax())
    assert exact >= 0.8 * len(tokens)


def test_bf16_engine_matches_a_bf16_reference_and_keeps_rope_in_fp32():
    model = _fresh_model()
    prompt = [(7 * j + 3) % 512 for j in range(40)]
    engine = make_engine(model, dtype="bfloat16", block_size=4)
    assert next(model.parameters()).dtype == torch.bfloat16  # cast in place
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, model.rotary._inv_freq())
    assert engine.runner.cache.dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    # Two sequences in one step: a chunked prefill next to decodes, all in bf16.
    outs = engine.generate([prompt, prompt[:9]], params)
    assert_near_greedy(model, prompt, outs[0].token_ids)
    assert_near_greedy(model, prompt[:9], outs[1].token_ids)


def test_from_model_dir_loads_in_the_configured_dtype(tiny_model_dir):
    engine = LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(dtype="bfloat16"), device="cpu",
                                      num_blocks=32)
    assert engine.runner.cache.dtype == torch.bfloat16
    assert engine.config.dtype == "auto"  # resolved at load time
    out = engine.generate("hello", SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.finished
