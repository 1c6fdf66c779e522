"""The contract between quantized linears and the one-call decode layer: int8 rows with scales.

The one-call batch-1 decode layer (models/llama.py) takes each projection's weights either as
bf16 matrices or as int8 rows with one fp32 scale per row. A linear that can offer the latter
implements ``Int8Rows`` (``quantized/linear.py``'s ``QuantizedLinear`` does); the model checks
for the protocol instead of importing the quantized package, which sits above it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Int8Rows(Protocol):
    """A linear whose weight may be read as int8 rows (N, K) and fp32 row scales (N,)."""

    def int8_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q, scales) where this layer can run the native int8 row kernel, else None."""
        ...


def int8_rows_of(module: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``module.int8_rows()`` for an ``Int8Rows`` module, None for any other."""
    return module.int8_rows() if isinstance(module, Int8Rows) else None
