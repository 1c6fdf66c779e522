"""Factories for runtime tests: a tiny source model dir, its compressed twin, the dequantized reference."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastserve_ray.models import build_model, get_preset, save_model_dir
from fastserve_ray.models.weights import load_tensors
from fastserve_ray.quantized.artifact import write_compressed_model_dir
from fastserve_ray.quantized.qtensor import QuantizedWeight
from fastserve_ray.tokenizer import Tokenizer

RECIPE = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"scheme": "W4A16"}}}}


def source_dir(path: Path, tokenizer: Tokenizer, preset: str = "tiny", **overrides) -> Path:
    """A random model dir; init_std 0.2 spreads the logits so greedy picks are far from ties."""
    torch.manual_seed(0)
    model = build_model(get_preset(preset, vocab_size=400, init_std=0.2, **overrides))
    return save_model_dir(path, model, tokenizer)


def quantize_tensors(model_dir: Path, scheme: str = "mixed") -> dict:
    """Every 2-D weight but the embedding/head quantized: int8 per-channel, int4 g32, or both."""
    tensors: dict = dict(load_tensors(model_dir))
    for name, t in list(tensors.items()):
        if t.dim() != 2 or name.startswith(("embed_tokens", "lm_head")):
            continue
        int8 = scheme == "int8" or (scheme == "mixed" and ("mlp" in name or "_ih_" in name))
        tensors[name] = QuantizedWeight.from_float(t, 8) if int8 else QuantizedWeight.from_float(t, 4, 32)
    return tensors


def compressed_dir(out: Path, source: Path, scheme: str = "mixed") -> tuple[Path, dict]:
    """Write ``source`` quantized as a compressed model directory; (path, tensors written)."""
    tensors = quantize_tensors(source, scheme)
    return write_compressed_model_dir(out, source, tensors, RECIPE, {}), tensors


def dequantized_reference(source: Path, tensors: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The float model whose weights are the quantized ones dequantized: what the runtime must equal."""
    from fastserve_ray.models import load_model_dir

    model = load_model_dir(source).model
    dense = {n: t.dequantize() if isinstance(t, QuantizedWeight) else t for n, t in tensors.items()}
    model.load_state_dict(dense, strict=False)
    return model.to(dtype).eval()


@torch.no_grad()
def reference_greedy(model: nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens from a full, uncached forward over the whole sequence per token."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]
