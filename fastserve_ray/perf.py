"""Machine limits measured in-process (a GEMM probe, a copy probe) and model FLOP counts, for MFU/MBU."""

from __future__ import annotations

import time

import torch

from fastserve_ray.config import ModelConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_gemm_flops(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024,
    repeats: int = 5,
) -> float:
    """Best-of-``repeats`` FLOP/s of a square matmul: the practical compute peak for MFU."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernels, caches
    _sync(device)
    best = 0.0
    for _ in range(repeats):
        n = 1
        while True:  # enough products to run ~50 ms, so timer noise stays small
            t0 = time.perf_counter()
            for _ in range(n):
                a @ b
            _sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed > 0.05:
                break
            n *= 2
        best = max(best, 2 * size**3 * n / elapsed)
    return best


def measure_copy_bandwidth(
    device: torch.device | str = "cpu", num_bytes: int = 1 << 28, repeats: int = 5
) -> float:
    """Best-of-``repeats`` bytes/s of a large copy (read + write counted): the bandwidth peak for MBU."""
    device = torch.device(device)
    src = torch.empty(num_bytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = max(best, 2 * num_bytes / (time.perf_counter() - t0))
    return best


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per trained token: 6·N for the matmul weights N (output head included,
    embedding lookup, norms and biases excluded) plus causal attention's 6·layers·dim·seq_len.

    Attention convention: QKᵀ and AV cost 2·2·dim·(keys attended) per token in the forward pass,
    times 3 for forward+backward. A causal mask attends seq_len/2 keys on average, which is what
    causal kernels (flash/SDPA with is_causal) execute, so this counts half of PaLM's
    12·layers·dim·seq_len, which assumes every token attends the whole window.
    """
    if cfg.is_recurrent:
        gates = {"rnn": 1, "lstm": 4, "gru": 3}[cfg.arch]
        n = cfg.n_layers * gates * 2 * cfg.dim * cfg.dim + cfg.dim * cfg.vocab_size
        return 6.0 * n
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.dim * cfg.ffn_dim
    n = cfg.n_layers * (attn + mlp) + cfg.dim * cfg.vocab_size
    return 6.0 * n + 6.0 * cfg.n_layers * cfg.dim * seq_len


_ALLOCATOR_TUNED = False


def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Make glibc keep large freed blocks instead of returning them to the OS.

    CPU inference allocates and frees the same large activations every step; by default
    glibc serves each from fresh mmap'd pages, and the page faults on first touch cost more
    than the work (measured: a 64-sequence decode step of the bench preset went from ~520 ms
    to ~240 ms). Returns False where this is not glibc. Process-wide, idempotent.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, threshold_bytes) == 1
        ok = libc.mallopt(m_trim_threshold, threshold_bytes) == 1 and ok
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok
