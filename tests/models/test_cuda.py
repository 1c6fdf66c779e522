"""The same model code on CUDA: fp32 agrees with the CPU, bf16 cached decode agrees with full."""

import pytest
import torch

from fastserve_ray.models import build_model, get_preset, load_model_dir
from fastserve_ray.models.generate import generate_tokens

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("preset", ["tiny", "lstm-tiny"])
def test_cuda_fp32_matches_cpu(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    tokens = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        cpu = model(tokens)
        gpu = model.to("cuda")(tokens.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=2e-3)  # TF32 matmuls allowed


def test_cuda_bf16_cached_generation_matches_full_forward(tiny_model_dir):
    loaded = load_model_dir(tiny_model_dir, device="cuda", dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    prompt = list(range(5, 25))
    out = generate_tokens(loaded.model, prompt, max_tokens=20)
    # Teacher-forced reference: a full (uncached) forward over prompt + output must pick the
    # same greedy tokens, except at near-ties that bf16 rounding may legitimately flip.
    seq = torch.tensor([prompt + out[:-1]], device="cuda")
    with torch.no_grad():
        full = loaded.model(seq)[0, len(prompt) - 1 :].float()
    for i, token in enumerate(out):
        margin = (full[i].max() - full[i, token]).item()
        assert margin <= 0.05, (i, token, int(full[i].argmax()), margin)
