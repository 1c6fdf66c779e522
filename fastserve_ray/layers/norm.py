"""RMSNorm, with the residual add fused into it on CPU (a native kernel where it applies)."""

from __future__ import annotations

import torch
from torch import nn

from fastserve_ray.kernels import norm_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 squares underflow), scale in the input dtype, as HF does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor | None,
                     native: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, norm(x + delta))``; one native call where it applies and ``native`` allows
        (x then updated in place: the caller passes the residual stream it owns)."""
        fused = norm_rope.add_rms_norm(x, delta, self.weight, self.eps) if native else None
        if fused is not None:
            return fused
        x = x if delta is None else x + delta
        return x, self(x)
