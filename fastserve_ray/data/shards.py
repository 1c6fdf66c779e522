"""Shard writing: rows are flushed to files as soon as a shard fills.

Each shard is written twice: a Parquet file (the portable, self-describing form that
eval, calibration and Ray Data read) and a raw ``.tokens`` file of fixed-width rows
(row_len little-endian int32 each), so a training worker reads any row with one
positioned read of row_len*4 bytes instead of decoding a whole row group.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fastserve_ray.data.manifest import ShardInfo, SplitInfo
from fastserve_ray.tokenizer import file_sha256


def shard_schema(row_len: int) -> pa.Schema:
    """Schema of every shard: tokens fixed_size_list<int32>[row_len], doc_id int64."""
    return pa.schema([("tokens", pa.list_(pa.int32(), row_len)), ("doc_id", pa.int64())])


def rows_to_table(rows: np.ndarray, doc_ids: np.ndarray) -> pa.Table:
    """An Arrow table in shard_schema from (n, row_len) int32 rows and n doc ids."""
    row_len = rows.shape[1]
    tokens = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(rows, dtype=np.int32).ravel()), row_len
    )
    return pa.Table.from_arrays(
        [tokens, pa.array(doc_ids, type=pa.int64())], schema=shard_schema(row_len)
    )


class ShardWriter:
    """Writes one split's rows to <root>/<split>/shard-NNNNN.parquet, rows_per_shard each."""

    def __init__(self, root: Path, split: str, row_len: int, rows_per_shard: int) -> None:
        self.root = root
        self.split = split
        self.row_len = row_len
        self.rows_per_shard = rows_per_shard
        self.info = SplitInfo()
        (root / split).mkdir(parents=True, exist_ok=True)
        self._rows: list[np.ndarray] = []
        self._doc_ids: list[np.ndarray] = []
        self._num_buffered = 0

    def add(self, rows: np.ndarray, doc_ids: np.ndarray) -> None:
        """Buffer rows; write every shard they fill."""
        if len(rows) == 0:
            return
        self._rows.append(rows)
        self._doc_ids.append(doc_ids)
        self._num_buffered += len(rows)
        while self._num_buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def close(self) -> SplitInfo:
        """Write the last, partial shard; return the split's rows and shards."""
        if self._num_buffered:
            self._flush(self._num_buffered)
        return self.info

    def _flush(self, num_rows: int) -> None:
        rows = np.concatenate(self._rows)
        doc_ids = np.concatenate(self._doc_ids)
        stem = f"{self.split}/shard-{len(self.info.shards):05d}"
        path = self.root / f"{stem}.parquet"
        pq.write_table(rows_to_table(rows[:num_rows], doc_ids[:num_rows]), path)
        tokens_path = self.root / f"{stem}.tokens"
        np.ascontiguousarray(rows[:num_rows], dtype="<i4").tofile(tokens_path)
        self.info.shards.append(ShardInfo(f"{stem}.parquet", num_rows, file_sha256(path),
                                          f"{stem}.tokens", file_sha256(tokens_path)))
        self.info.num_rows += num_rows
        # Copy the remainder so the concatenated buffer is freed, not kept alive by a view.
        self._rows, self._doc_ids = [rows[num_rows:].copy()], [doc_ids[num_rows:].copy()]
        self._num_buffered -= num_rows
