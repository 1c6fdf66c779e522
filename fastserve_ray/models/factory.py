"""Build the right model class for a config."""

from __future__ import annotations

import torch
from torch import nn

from fastserve_ray.config import ModelConfig
from fastserve_ray.models.llama import LlamaModel
from fastserve_ray.models.recurrent import RecurrentLM


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model for ``cfg`` (Llama decoder or recurrent LM)."""
    return RecurrentLM(cfg) if cfg.is_recurrent else LlamaModel(cfg)


def build_empty_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """A model with uninitialised weights, for loading a checkpoint without paying for init."""
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=device)
    model.post_materialize()
    return model


def num_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameter count (tied weights once); optionally without the token embedding/head."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if non_embedding and name.startswith(("embed_tokens", "lm_head")):
            continue
        total += p.numel()
    return total
