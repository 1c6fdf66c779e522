"""Training rows in each worker: Ray Data reads the Parquet shards into the object store once;
workers fetch the blocks (zero-copy on the same node) and gather rows by global index."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from fastserve_ray.data import ray_dataset


def load_row_blocks(data_dir: str | Path, split: str) -> list[ray.ObjectRef]:
    """Read ``split`` with Ray Data, in shard order, as object refs to Arrow blocks (driver side)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # row index i means the same row in every worker
    ctx.enable_progress_bars = False
    # One small read per run: Ray Data's per-operator INFO lines would drown the training progress.
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.WARNING)
    try:
        return ray_dataset(data_dir, split).to_arrow_refs()
    finally:
        data_logger.setLevel(level)


class RowStore:
    """Rows of one split held as the object store's blocks; ``take`` gathers rows by global index."""

    def __init__(self, block_refs: list[ray.ObjectRef], row_len: int) -> None:
        self.blocks = [_tokens(t, row_len) for t in ray.get(block_refs)]
        self.offsets = np.cumsum([0] + [len(b) for b in self.blocks])
        self.row_len = row_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), row_len) int64 array of the rows at ``indices``."""
        out = np.empty((len(indices), self.row_len), dtype=np.int64)
        block_ids = np.searchsorted(self.offsets, indices, side="right") - 1
        for i, (b, idx) in enumerate(zip(block_ids, indices)):
            out[i] = self.blocks[b][idx - self.offsets[b]]
        return out


def _tokens(table: pa.Table, row_len: int) -> np.ndarray:
    column = table.column("tokens")
    if column.num_chunks == 0:
        return np.empty((0, row_len), dtype=np.int32)
    return np.concatenate([c.flatten().to_numpy().reshape(-1, row_len) for c in column.chunks])
