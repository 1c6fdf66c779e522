"""One mechanism for projections that read the same input (q|k|v, gate|up): a fused linear.

A ``FusedLinear`` computes several linears of one input as one product, their outputs side by
side. It holds its members in a plain list, so it owns no parameters or buffers and the model's
``state_dict`` is unchanged; the members stay where they are. Each implementation says how it
computes the fused product (``fused``), or returns None where it cannot for this input, and the
members then run one by one. ``install_fused`` puts one on every group a model names in
``fusable_linears()``: oneDNN-packed weights (layers/packed_linear.py) and int8 rows
(quantized/fused.py) are the two implementations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class FusedLinear(nn.Module):
    """Several linears of one input as one: ``cat([m(x) for m in members], -1)``."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len({m.in_features for m in members}) != 1:
            raise ValueError("fused linears must share their input size")
        self.members = list(members)  # a plain list: no parameters of its own
        self.in_features = members[0].in_features
        self.out_features = sum(m.out_features for m in members)

    def fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The members' outputs side by side in one product, or None where this input does not
        take the fused path (then the members run one by one)."""
        return None

    def run_members(self, x: torch.Tensor) -> torch.Tensor:
        """The members' outputs side by side, each member run on its own."""
        return torch.cat([m(x) for m in self.members], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused(x)
        return self.run_members(x) if y is None else y


def install_fused(model: nn.Module, make: Callable[[list[nn.Module]], FusedLinear | None]) -> int:
    """For each group of ``model.fusable_linears()`` (owner, attribute, members), set
    ``owner.attribute = make(members)`` where that is not None; how many were installed."""
    count = 0
    groups = model.fusable_linears() if hasattr(model, "fusable_linears") else []
    for owner, attr, members in groups:
        fused = make(list(members))
        if fused is not None:
            setattr(owner, attr, fused)
            count += 1
    return count
