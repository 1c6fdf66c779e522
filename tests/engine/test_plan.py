"""The engine plan: backends resolved once from the config and the machine, logged, reported."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from fastserve_ray.capability import capability
from fastserve_ray.engine import LLMEngine, SamplingParams
from fastserve_ray.engine.engine_config import EngineConfig
from fastserve_ray.engine.plan import resolve_plan
from fastserve_ray.errors import ConfigError
from fastserve_ray.layers.packed_linear import PackedFusedLinear, can_pack
from fastserve_ray.models import build_model, get_preset

CPU = torch.device("cpu")
AVX2 = dataclasses.replace(capability(), isa="avx2", cpu_flags=frozenset({"avx2", "fma"}))
NO_COMPILER = dataclasses.replace(capability(), compiler=None)


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("tiny")).eval().to(dtype)


def test_an_avx2_machine_gets_plain_bf16_linears_and_packed_fp32_ones():
    bf16 = resolve_plan(EngineConfig(), CPU, torch.bfloat16, cap=AVX2)
    assert bf16.linear == "plain" and not bf16.few_rows_linear and not bf16.one_call_decode
    fp32 = resolve_plan(EngineConfig(), CPU, torch.float32, cap=AVX2)
    assert fp32.linear == ("onednn-packed" if can_pack(torch.float32) else "plain")
    assert "cpu=avx2" in fp32.line()
    with pytest.raises(ConfigError, match=r"onednn-packed.*cannot run here: needs oneDNN bf16"):
        resolve_plan(EngineConfig(linear_backend="onednn-packed"), CPU, torch.bfloat16, cap=AVX2)


def test_without_a_compiler_or_switched_off_the_plan_has_no_native_kernels(monkeypatch, tmp_path):
    # Kernels built at install still load once the compiler is gone: only an unbuilt machine
    # without a compiler (an empty kernel cache here) runs without them.
    assert resolve_plan(EngineConfig(), CPU, torch.float32, cap=NO_COMPILER).native_kernels == \
        (capability().lacks("native_kernels") is None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for plan in (resolve_plan(EngineConfig(), CPU, torch.float32, cap=NO_COMPILER),
                 resolve_plan(EngineConfig(native_kernels=False), CPU, torch.float32)):
        assert not plan.native_kernels and plan.decode_attention == "per-sequence"
        assert "native_kernels=off" in plan.line()
    assert not list(tmp_path.rglob("*.so"))  # and nothing was built


def test_cuda_and_compile_choices():
    plan = resolve_plan(EngineConfig(), torch.device("cuda"), torch.bfloat16)
    assert plan.linear == "plain" and not plan.native_kernels and plan.decode_attention == "per-sequence"
    with pytest.raises(ConfigError, match="is for CPUs, not cuda"):
        resolve_plan(EngineConfig(linear_backend="onednn-packed"), torch.device("cuda"), torch.bfloat16)
    assert resolve_plan(EngineConfig(compile=True), CPU, torch.float32).linear == "plain"


def test_the_engine_logs_its_plan_once_and_reports_it(caplog, tiny_tokenizer):
    with caplog.at_level(logging.INFO, logger="fastserve_ray.engine.llm_engine"):
        engine = LLMEngine(_model(), tiny_tokenizer, num_blocks=16)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine plan:")]
    assert lines == [engine.plan.line()]
    assert "device=cpu dtype=float32" in lines[0]
    snap = engine.load_snapshot()
    assert snap["plan"] == engine.plan.as_dict() and json.loads(json.dumps(snap))["plan"]["device"] == "cpu"
    assert isinstance(snap["num_waiting"], float)


def test_plain_linears_and_no_native_kernels_give_the_same_greedy_tokens(tiny_tokenizer):
    prompts = [[(5 * i + 3 * j) % 300 + 3 for j in range(n)] for i, n in enumerate([4, 23, 9])]
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 3
    default = LLMEngine(_model(), tiny_tokenizer, num_blocks=24)
    plain = LLMEngine(_model(), tiny_tokenizer, num_blocks=24, linear_backend="plain", native_kernels=False)
    assert plain.plan.linear == "plain" and not plain.plan.native_kernels
    assert not isinstance(plain.runner.model.layers[0].mlp.fused_gate_up, PackedFusedLinear)
    assert [o.token_ids for o in plain.generate(prompts, params)] == \
        [o.token_ids for o in default.generate(prompts, params)]


def test_bad_backend_names_are_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match="engine.linear_backend must be one of"):
        EngineConfig(linear_backend="mkl")
    with pytest.raises(ConfigError, match="engine.native_kernels must be true or false"):
        EngineConfig(native_kernels="yes")
