"""Device auto-detection: CUDA with bf16 where present, else the CPU (bf16 only where it is fast)."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The first CUDA device when one is visible, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX tiles; FASTSERVE_CPU_ISA
    may lower what counts)."""
    from fastserve_ray.capability import capability

    return capability().fast_bf16


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs and on CPUs with native bf16 math; fp32 elsewhere (emulated bf16 is slower)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``"auto"`` -> default_dtype(device); ``"float32"`` / ``"bfloat16"`` as named."""
    return default_dtype(device) if name == "auto" else DTYPES[name]
