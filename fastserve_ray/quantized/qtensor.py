"""The in-memory contract between compression stages, the artifact codec and the runtime.

A quantized linear weight W[N, K] (N output rows, K input columns) is stored as signed
integers and one float scale per group of ``group_size`` consecutive input columns:

    W[n, k] ~= q[n, k] * scale[n, k // group_size]

Symmetric (no zero point), the convention compressed-tensors calls ``symmetric: true``, so a
pruned (zero) weight stays exactly zero after quantization and sparsity survives it.
Per-output-channel quantization is the case ``group_size == K`` (``scale`` is [N, 1]).
"""

from __future__ import annotations

import dataclasses

import torch

SUPPORTED_BITS = (3, 4, 8)


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer range of ``bits``-bit symmetric quantization: (-2^(b-1), 2^(b-1) - 1)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported (choose from {SUPPORTED_BITS})")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight as signed integers + per-group float scales (see the module docstring)."""

    q: torch.Tensor  # int8 [N, K], every value within qrange(bits)
    scale: torch.Tensor  # float32 [N, K // group_size]
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        lo, hi = qrange(self.bits)
        if self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError(f"q must be a 2-D int8 tensor, got {self.q.dtype} {tuple(self.q.shape)}")
        n, k = self.q.shape
        if self.group_size < 1 or k % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the input width {k}")
        if tuple(self.scale.shape) != (n, k // self.group_size):
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != {(n, k // self.group_size)}")
        if self.q.numel() and (int(self.q.min()) < lo or int(self.q.max()) > hi):
            raise ValueError(f"q holds values outside the {self.bits}-bit range [{lo}, {hi}]")

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K): the shape of the dense weight."""
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight q * scale, [N, K] in ``dtype``."""
        scale = self.scale.to(torch.float32).repeat_interleave(self.group_size, dim=1)
        return (self.q.to(torch.float32) * scale).to(dtype)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedWeight:
        """Round-to-nearest: scale = absmax(group) / qmax, q = clamp(round(w / scale))."""
        lo, hi = qrange(bits)
        w = weight.detach().to(torch.float32)
        n, k = w.shape
        g = group_size or k
        if k % g:
            raise ValueError(f"group_size={g} does not divide the input width {k}")
        groups = w.reshape(n, k // g, g)
        scale = groups.abs().amax(dim=2) / hi
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale
        q = torch.clamp(torch.round(groups / scale.unsqueeze(2)), lo, hi).to(torch.int8)
        return cls(q.reshape(n, k), scale, bits, g)
