"""Pruning stages: pure tensor functions that return a weight with exact zeros.

- magnitude: drop the smallest |W| per layer, or below one threshold shared by all layers (global);
- N:M (e.g. 2:4): in every group of M consecutive input columns keep the N largest scores;
- Wanda (Sun et al. 2023): score = |W| * ||X_j||_2, the weight times the norm of its input channel
  over the calibration tokens, compared within each output row (as the paper does).

Ties are broken by position (a stable sort), so the same inputs always give the same mask.
"""

from __future__ import annotations

import torch


def parse_mask_structure(structure: str) -> tuple[int, int] | None:
    """"unstructured" -> None, "N:M" -> (N, M) with 0 < N < M."""
    if structure == "unstructured":
        return None
    try:
        n, m = (int(x) for x in structure.split(":"))
    except ValueError:
        raise ValueError(f"mask_structure {structure!r}: use 'unstructured' or 'N:M' (e.g. '2:4')") from None
    if not 0 < n < m:
        raise ValueError(f"mask_structure {structure!r} needs 0 < N < M")
    return n, m


def _keep_top(scores: torch.Tensor, num_drop: int) -> torch.Tensor:
    """Mask of ``scores`` (rows, items) dropping the ``num_drop`` lowest per row (stable)."""
    order = torch.argsort(scores, dim=-1, stable=True)
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order[..., :num_drop], False)
    return mask


def mask_from_scores(scores: torch.Tensor, sparsity: float, structure: str = "unstructured",
                     per_row: bool = False) -> torch.Tensor:
    """Boolean keep-mask [N, K] from importance ``scores``: unstructured (whole tensor or per row) or N:M."""
    n_rows, k = scores.shape
    nm = parse_mask_structure(structure)
    if nm is not None:
        keep, group = nm
        if k % group:
            raise ValueError(f"{structure} sparsity needs an input width divisible by {group}, got {k}")
        grouped = scores.reshape(n_rows, k // group, group)
        return _keep_top(grouped, group - keep).reshape(n_rows, k)
    if per_row:
        return _keep_top(scores, int(k * sparsity))
    return _keep_top(scores.reshape(1, -1), int(scores.numel() * sparsity)).reshape(n_rows, k)


def magnitude_prune(weight: torch.Tensor, sparsity: float, structure: str = "unstructured") -> torch.Tensor:
    """Zero the fraction ``sparsity`` of the smallest-magnitude weights of one layer (or N:M)."""
    return weight * mask_from_scores(weight.abs().float(), sparsity, structure)


def global_magnitude_threshold(weights: list[torch.Tensor], sparsity: float) -> float:
    """The |W| below which a fraction ``sparsity`` of all the given weights lies."""
    flat = torch.cat([w.detach().abs().float().reshape(-1) for w in weights])
    num_drop = int(flat.numel() * sparsity)
    if num_drop == 0:
        return -1.0  # prune nothing: every |w| >= 0 > -1
    return float(torch.kthvalue(flat, num_drop).values)


def threshold_prune(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero every weight with |W| <= threshold (global magnitude pruning, one layer at a time)."""
    return torch.where(weight.abs() > threshold, weight, torch.zeros_like(weight))


def wanda_prune(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float,
                structure: str = "unstructured") -> torch.Tensor:
    """Wanda: zero the lowest |W[n, j]| * ||X_j|| within each output row (or each N:M group)."""
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm has shape {tuple(input_norm.shape)}, expected ({weight.shape[1]},)")
    scores = weight.abs().float() * input_norm.float()[None, :]
    return weight * mask_from_scores(scores, sparsity, structure, per_row=True)
