"""Reading prepared shards back: as one numpy array (eval, tests) or as a Ray Dataset."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from fastserve_ray import storage
from fastserve_ray.data.manifest import load_data_manifest
from fastserve_ray.errors import DataError

if TYPE_CHECKING:
    import ray.data


def split_files(data_dir: str | Path, split: str = "train") -> list[str]:
    """Absolute paths (or URIs) of ``split``'s shard files, in row order (manifest read, not hashed)."""
    manifest = load_data_manifest(data_dir, verify=False)
    if storage.is_uri(data_dir):
        return [storage.join(data_dir, shard.path) for shard in manifest.split(split).shards]
    return [str((Path(data_dir) / shard.path).resolve()) for shard in manifest.split(split).shards]


def read_split(data_dir: str | Path, split: str = "train") -> np.ndarray:
    """All rows of ``split`` as a (num_rows, row_len) int32 array, in row order."""
    manifest = load_data_manifest(data_dir, verify=False)
    parts = []
    for shard in manifest.split(split).shards:
        fs, inner = storage.resolve(storage.join(data_dir, shard.path))  # local or s3://...
        column = pq.read_table(inner, columns=["tokens"], filesystem=fs).column("tokens")
        for chunk in column.chunks:
            # flatten() honours slice offsets, unlike .values.
            parts.append(chunk.flatten().to_numpy().reshape(-1, manifest.row_len))
    if not parts:
        return np.empty((0, manifest.row_len), dtype=np.int32)
    return np.concatenate(parts).astype(np.int32, copy=False)


def ray_dataset(data_dir: str | Path, split: str = "train") -> ray.data.Dataset:
    """A Ray Dataset over ``split``'s shards: columns tokens (row_len int32 list), doc_id.

    Row order across blocks is not guaranteed unless the DataContext preserves order.
    ``iter_torch_batches`` yields tokens as a (batch, row_len) int32 tensor.
    """
    import ray.data  # here, so the rest of the data layer does not need Ray

    files = split_files(data_dir, split)
    if not files:
        raise DataError(f"split {split!r} of data directory {data_dir} has no rows")
    return ray.data.read_parquet(files)
