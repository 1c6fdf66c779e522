"""Loss-curve PNG from the metrics history (train loss and validation loss against step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> Path:
    """Write train/validation loss against optimizer step to ``path``."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([m["step"] for m in history], [m["loss"] for m in history], label="train loss")
    val = [m for m in history if "val_loss" in m]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
