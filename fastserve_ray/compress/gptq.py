"""GPTQ (Frantar et al. 2022): quantize one column at a time, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

H = 2/n * X^T X from the calibration activations X (n tokens x K inputs), dampened by
``dampening_frac * mean(diag H)`` on the diagonal. Columns are processed in blocks of
``block_size``; inside a block the update is applied column by column, and the block's
accumulated error updates the remaining columns in one matmul at the end ("lazy batch").
Group scales are computed when the first column of a group is reached, from the weights as the
earlier updates left them, so they fit what is actually rounded. Symmetric, like
QuantizedWeight.from_float; with ``keep_zeros`` pruned weights stay exactly zero.
"""

from __future__ import annotations

import torch

from fastserve_ray.quantized.qtensor import QuantizedWeight, qrange


def hessian_from_gram(gram: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """H = 2/n X^T X from the accumulated Gram matrix X^T X of ``num_tokens`` input rows."""
    if num_tokens < 1:
        raise ValueError("GPTQ needs calibration tokens (num_tokens is 0)")
    return gram.to(torch.float64) * (2.0 / num_tokens)


def _inverse_cholesky(h: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening; more damping if H is numerically singular."""
    k = h.shape[0]
    damp = dampening_frac * float(torch.diag(h).mean())
    for attempt in range(6):
        hd = h + torch.eye(k, dtype=h.dtype) * damp * (10**attempt)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
    raise ValueError("the Hessian is not positive definite even after heavy dampening")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    keep_zeros: bool = False,
) -> QuantizedWeight:
    """Quantize ``weight`` [N, K] with GPTQ given its inputs' Hessian [K, K]."""
    lo, hi = qrange(bits)
    n, k = weight.shape
    g = group_size or k
    if k % g:
        raise ValueError(f"group_size={g} does not divide the input width {k}")
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian has shape {tuple(hessian.shape)}, expected ({k}, {k})")
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    keep = (weight != 0) if keep_zeros else None
    dead = torch.diag(h) == 0  # inputs never active: their weights cannot matter, zero them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, dampening_frac)

    # Whole groups per block, so a group's scale is taken from up-to-date weights.
    block = max(g, (block_size // g) * g) if g < k else block_size
    q = torch.zeros(n, k, dtype=torch.int8)
    scale = torch.zeros(n, k // g, dtype=torch.float64)
    if g == k:  # per channel: one scale per row, from the original weights (as GPTQ does)
        scale[:, 0] = _scale(w, hi)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if g < k and col % g == 0:
                scale[:, col // g] = _scale(w1[:, i : i + g], hi)
            s = scale[:, col // g]
            qc = torch.clamp(torch.round(w1[:, i] / s), lo, hi)
            if keep is not None:
                qc = qc * keep[:, col]
            q[:, col] = qc.to(torch.int8)
            err = (w1[:, i] - qc * s) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return QuantizedWeight(q, scale.to(torch.float32), bits, g)


def _scale(cols: torch.Tensor, qmax: int) -> torch.Tensor:
    """Symmetric absmax / qmax per row; 1 for all-zero rows (any scale represents zeros)."""
    s = cols.abs().amax(dim=1) / qmax
    # Rounded to the float32 the artifact stores, so the error pushed on is the stored one.
    return torch.where(s > 0, s, torch.ones_like(s)).to(torch.float32).to(torch.float64)
