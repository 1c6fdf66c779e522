"""A compressed model directory served by the engine and the CLI, unchanged."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import compressed_dir, dequantized_reference, reference_greedy, source_dir

import fastserve_ray.models.llama as llama_module
from fastserve_ray.capability import capability
from fastserve_ray.cli import main
from fastserve_ray.engine import LLMEngine, SamplingParams
from fastserve_ray.kernels.small_linear import small_linear_int8_kernel
from fastserve_ray.quantized.fused import QuantizedFusedLinear
from fastserve_ray.quantized.linear import QuantizedLinear

NO_BF16_KERNEL = (capability().lacks_any("avx512_bf16", "native_kernels")
                  or "the native kernels failed to build")

PROMPTS = [[(7 * i + 3 * j) % 400 for j in range(n)] for i, n in enumerate((1, 6, 21))]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("engine")
    src = source_dir(root / "src", tiny_tokenizer)
    out, tensors = compressed_dir(root / "int", src)
    return src, out, tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_greedy_equals_dequantized_reference(dirs, dtype):
    src, out, tensors = dirs
    # The default loader of from_model_dir: a compressed directory needs nothing else.
    engine = LLMEngine.from_model_dir(out, device="cpu", dtype=dtype, block_size=8, num_blocks=64,
                                      max_num_seqs=4, max_num_batched_tokens=32)
    assert any(isinstance(m, QuantizedLinear) for m in engine.runner.model.modules())
    # The int8 gate|up (the "mixed" scheme's int8 part) runs as one call where the native int8
    # kernel exists; the int4 q|k|v stay separate.
    fused = [m for m in engine.runner.model.modules() if isinstance(m, QuantizedFusedLinear)]
    assert len(fused) == (engine.model_config.n_layers if small_linear_int8_kernel() else 0)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(PROMPTS, params)  # batched decode and chunked prefill together
    ref = dequantized_reference(src, tensors, dtype)
    if dtype == torch.float32:
        for prompt, output in zip(PROMPTS, outputs):
            assert output.token_ids == reference_greedy(ref, prompt, MAX_TOKENS)
        return
    # bf16: the int kernels and the reference round differently (and the cached and uncached
    # paths do too), so an exact tie-break may differ. Teacher-forced on the engine's own
    # tokens, every pick must be the reference's argmax or within bf16 rounding of it.
    num_exact = 0
    for prompt, output in zip(PROMPTS, outputs):
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + output.token_ids]))[0, len(prompt) - 1 : -1].float()
        best = logits.max(dim=-1).values
        picked = logits.gather(1, torch.tensor(output.token_ids)[:, None])[:, 0]
        assert bool((best - picked <= 0.02 * logits.abs().max()).all()), (best - picked).max()
        num_exact += int((picked == best).sum())
    assert num_exact >= 0.9 * MAX_TOKENS * len(PROMPTS)


def test_engine_runs_a_compressed_recurrent_model(tmp_path, tiny_tokenizer):
    src = source_dir(tmp_path / "src", tiny_tokenizer, "lstm-tiny")
    out, tensors = compressed_dir(tmp_path / "int8", src, scheme="int8")
    engine = LLMEngine.from_model_dir(out, device="cpu", dtype=torch.float32, num_blocks=8, max_num_seqs=4,
                                      max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    ref = dequantized_reference(src, tensors)
    for prompt, output in zip(PROMPTS, engine.generate(PROMPTS, params)):
        assert output.token_ids == reference_greedy(ref, prompt, MAX_TOKENS)


def test_generate_cli_accepts_a_compressed_directory(dirs, capsys):
    _, out, _ = dirs
    assert main(["generate", "--model", str(out), "--prompt", "def", "--max-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")


@pytest.mark.skipif(small_linear_int8_kernel() is None, reason=NO_BF16_KERNEL)
@pytest.mark.parametrize("qkv_bias", [False, True])  # True: Qwen2's biased q|k|v, int8 rows too
def test_int8_batch_one_decode_runs_each_layer_in_one_call(tmp_path, tiny_tokenizer, monkeypatch, qkv_bias):
    src = source_dir(tmp_path / "src", tiny_tokenizer, qkv_bias=qkv_bias)
    out, _ = compressed_dir(tmp_path / "int8", src, scheme="int8")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)

    def run(one_token: bool) -> list:
        engine = LLMEngine.from_model_dir(out, device="cpu", dtype=torch.bfloat16, block_size=8,
                                          num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32)
        model = engine.runner.model
        # Both paths on the same kernel (the probe may pick int8pack per call on another run).
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m.plans[torch.bfloat16] = ("int8row",) * 4
            elif isinstance(m, QuantizedFusedLinear):
                m.plans[torch.bfloat16] = (True, False, False, False)
        weights = model._collect_one_token_weights()
        assert len(weights) == model.config.n_layers and weights[0][1][1]  # int8 rows, with scales
        assert all(b is not None for b in weights[0][1][2]) == qkv_bias  # q|k|v biases passed
        if not one_token:
            model._one_token_layers = lambda *args, **kwargs: None
        return [(o.token_ids, o.logprobs) for o in engine.generate([PROMPTS[2]], params)]

    calls: list = []
    kernel = llama_module.decode_layer_kernel()
    counting = lambda *args: calls.append(1) or kernel(*args)  # noqa: E731
    monkeypatch.setattr(llama_module, "decode_layer_kernel", lambda: counting)
    fast = run(True)
    assert len(calls) == (MAX_TOKENS - 1) * 2  # the tiny preset's 2 layers, every decode step
    assert fast == run(False)  # the same kernels one by one: bit for bit
