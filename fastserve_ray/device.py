"""Device auto-detection: CUDA with bf16 where present, else CPU with fp32."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The first CUDA device when one is visible, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs (tensor cores, fp32 range); fp32 on CPUs, where bf16 matmuls are slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
