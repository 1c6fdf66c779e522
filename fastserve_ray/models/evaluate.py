"""Perplexity of a model on token rows (row = inputs + one shifted target)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate_rows(model: nn.Module, rows: np.ndarray, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss and perplexity over ``rows`` (num_rows, seq_len + 1)."""
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] < 2:
        raise ValueError(f"need a non-empty (rows, seq_len + 1) array, got shape {rows.shape}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        batch = torch.as_tensor(rows[start : start + batch_size], dtype=torch.int64, device=device)
        logits = model(batch[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    mean = total_loss / total_tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "num_tokens": total_tokens}
