"""Several int8 per-channel ``QuantizedLinear``s of one input (q|k|v, gate|up) as one native call."""

from __future__ import annotations

import torch
from torch import nn

from fastserve_ray.kernels.small_linear import small_linear_int8_kernel
from fastserve_ray.layers.fused import FusedLinear, install_fused
from fastserve_ray.quantized.autotune import bucket_of, probe_fused
from fastserve_ray.quantized.linear import QuantizedLinear


class QuantizedFusedLinear(FusedLinear):
    """Several int8 per-channel ``QuantizedLinear``s of one input as one product, their outputs
    side by side: the compressed counterpart of the engine's fused q|k|v and gate|up.

    For few rows (decode), one native ``int8row`` call can compute all members at once, so a
    layer pays one dispatch and one thread fork instead of one per member. Whether it does is
    measured per batch-size bucket, like the members' own kernels (``probe_fused``): the fused
    call against the members run one by one with their plans. It holds the members in a plain
    list: it owns no parameters or buffers, and the model's ``state_dict`` is unchanged.
    """

    def __init__(self, members: list[QuantizedLinear]) -> None:
        if not self.fusable(members):
            raise ValueError("only int8 per-channel QuantizedLinears without bias, of one input size, fuse")
        super().__init__(members)
        self.plans: dict[torch.dtype, tuple[bool, ...]] = {}  # dtype -> one fused call, per bucket

    @staticmethod
    def fusable(members: list[nn.Module]) -> bool:
        """Whether ``members`` can share one ``int8row`` call."""
        return (len(members) > 1 and all(
            isinstance(m, QuantizedLinear) and m.storage == "int8" and m.group_size == m.in_features
            and m.bias is None and "int8row" in m.available for m in members)
            and len({m.in_features for m in members}) == 1)

    def run_fused(self, x2: torch.Tensor) -> torch.Tensor:
        """All members' outputs for 2-D ``x2`` from one native call, in x2's dtype."""
        xb = x2.to(torch.bfloat16).contiguous()
        y = xb.new_empty(xb.shape[0], self.out_features)
        small_linear_int8_kernel()(xb, [m.q for m in self.members], [m.row_scales() for m in self.members], y)
        return y.to(x2.dtype)

    def plan_for(self, dtype: torch.dtype) -> tuple[bool, ...]:
        """Per batch bucket, whether one fused call runs (probed on first use)."""
        plan = self.plans.get(dtype)
        if plan is None:
            plan = self.plans[dtype] = probe_fused(self, dtype)
        return plan

    def fused(self, x: torch.Tensor) -> torch.Tensor | None:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] and self.plan_for(x.dtype)[bucket_of(x2.shape[0])]:
            return self.run_fused(x2).view(*shape[:-1], self.out_features)
        return None  # each member with its own plan


def fuse_quantized_projections(model: nn.Module) -> int:
    """Install a ``QuantizedFusedLinear`` for each group of ``model.fusable_linears()`` whose
    members qualify (see ``QuantizedFusedLinear.fusable``); how many were installed."""
    return install_fused(model, lambda members: QuantizedFusedLinear(members)
                         if QuantizedFusedLinear.fusable(members) else None)
