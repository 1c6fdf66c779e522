"""One weight's compression, as a pure function of the weight, its plan and its statistics."""

from __future__ import annotations

import torch

from fastserve_ray.compress.gptq import gptq_quantize, hessian_from_gram
from fastserve_ray.compress.prune import magnitude_prune, threshold_prune, wanda_prune
from fastserve_ray.compress.quantize import quantize_rtn
from fastserve_ray.compress.recipe import LayerPlan
from fastserve_ray.quantized.qtensor import QuantizedWeight

Stats = tuple[torch.Tensor, int]  # (Gram matrix X^T X of the layer's inputs, number of tokens)


def compress_weight(
    weight: torch.Tensor,
    plan: LayerPlan,
    stats: Stats | None = None,
    global_threshold: float | None = None,
) -> torch.Tensor | QuantizedWeight:
    """Prune (if planned), then quantize (if planned): a float tensor with zeros or a QuantizedWeight."""
    w = weight.detach().to(torch.float32)
    p, q = plan.prune, plan.quant
    if p is not None:
        if p.method == "wanda":
            gram = _need(stats, plan)[0]
            w = wanda_prune(w, torch.sqrt(torch.diagonal(gram).clamp_min(0)), p.sparsity, p.structure)
        elif p.scope == "global":
            if global_threshold is None:
                raise ValueError(f"{plan.name}: global magnitude pruning needs the shared threshold")
            w = threshold_prune(w, global_threshold)
        else:
            w = magnitude_prune(w, p.sparsity, p.structure)
    if q is None:
        return w.to(weight.dtype)
    if q.method == "gptq":
        gram, num_tokens = _need(stats, plan)
        return gptq_quantize(w, hessian_from_gram(gram, num_tokens), q.bits, q.group_size,
                             q.block_size, q.dampening_frac, keep_zeros=p is not None)
    return quantize_rtn(w, q.bits, q.group_size)


def _need(stats: Stats | None, plan: LayerPlan) -> Stats:
    if stats is None:
        raise ValueError(f"{plan.name}: this recipe needs calibration statistics for the layer")
    return stats
