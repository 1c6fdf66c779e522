"""Pruning stages on hand-checked cases."""

from __future__ import annotations

import pytest
import torch

from fastserve_ray.compress.prune import (
    global_magnitude_threshold,
    magnitude_prune,
    mask_from_scores,
    threshold_prune,
    wanda_prune,
)


def test_magnitude_per_layer_drops_the_smallest() -> None:
    w = torch.tensor([[1.0, -4.0, 0.5, 3.0], [-2.0, 0.1, 5.0, -0.2]])
    out = magnitude_prune(w, 0.5)
    assert out.tolist() == [[0.0, -4.0, 0.0, 3.0], [-2.0, 0.0, 5.0, 0.0]]


def test_2of4_keeps_two_largest_per_group() -> None:
    w = torch.tensor([[1.0, -4.0, 0.5, 3.0, 9.0, 8.0, -7.0, 0.0]])
    assert magnitude_prune(w, 0.5, "2:4").tolist() == [[0.0, -4.0, 0.0, 3.0, 9.0, 8.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="divisible by 4"):
        magnitude_prune(torch.ones(1, 6), 0.5, "2:4")


def test_global_threshold_spans_layers() -> None:
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0, 5.0, 6.0]])
    t = global_magnitude_threshold([a, b], 0.5)  # 3 of 6 weights: 1, 2, 3
    assert t == 3.0
    assert threshold_prune(a, t).tolist() == [[0.0, 0.0]]  # a whole layer can go
    assert threshold_prune(b, t).tolist() == [[0.0, 4.0, 5.0, 6.0]]


def test_wanda_uses_input_norms_per_row() -> None:
    # Magnitude alone would drop column 0 (|w| = 1); its input norm 10 makes it the most important.
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    norm = torch.tensor([10.0, 1.0, 1.0, 1.0])
    assert wanda_prune(w, norm, 0.5).tolist() == [[1.0, 0.0, 0.0, 4.0], [1.0, 0.0, 0.0, 4.0]]
    assert magnitude_prune(w, 0.5)[:, 0].tolist() == [0.0, 0.0]


def test_ties_break_by_position() -> None:
    mask = mask_from_scores(torch.ones(1, 4), 0.5)
    assert mask.tolist() == [[False, False, True, True]]
