"""Round-to-nearest quantization stages: int8 per output channel, int3/int4/int8 group-wise.

Both are QuantizedWeight.from_float (symmetric, scale = absmax / qmax): pruned zeros stay zero.
"""

from __future__ import annotations

import torch

from fastserve_ray.quantized.qtensor import QuantizedWeight


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Round-to-nearest; ``group_size=None`` means one scale per output channel (row)."""
    return QuantizedWeight.from_float(weight, bits, group_size)


def quantize_int8_per_channel(weight: torch.Tensor) -> QuantizedWeight:
    """int8, one symmetric scale per output row."""
    return quantize_rtn(weight, 8, None)
