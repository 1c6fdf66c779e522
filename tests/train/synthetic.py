"""Generated data directories of any size: random tokens written straight into shards (no corpus)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fastserve_ray.data.manifest import TOKENIZER_NAME, DataManifest
from fastserve_ray.data.shards import ShardWriter
from fastserve_ray.tokenizer import Tokenizer, file_sha256


def write_random_data(out: Path, tokenizer: Tokenizer, num_rows: int, seq_len: int,
                      rows_per_shard: int = 2048, num_val_rows: int = 64, seed: int = 0) -> Path:
    """A prepared data directory of ``num_rows`` random training rows (written a shard at a time)."""
    out.mkdir(parents=True)
    shutil.copyfile(tokenizer.path, out / TOKENIZER_NAME)
    rng = np.random.default_rng(seed)
    splits = {}
    for name, rows in (("train", num_rows), ("validation", num_val_rows)):
        writer = ShardWriter(out, name, seq_len + 1, rows_per_shard)
        for start in range(0, rows, rows_per_shard):
            n = min(rows_per_shard, rows - start)
            writer.add(rng.integers(0, tokenizer.vocab_size, (n, seq_len + 1), dtype=np.int32),
                       np.arange(start, start + n))
        splits[name] = writer.close()
    DataManifest(
        tokenizer_sha256=file_sha256(out / TOKENIZER_NAME), vocab_size=tokenizer.vocab_size,
        seq_len=seq_len, eos_id=tokenizer.eos_id, num_documents=num_rows,
        num_tokens=(num_rows + num_val_rows) * (seq_len + 1), sources=["generated"], splits=splits,
    ).save(out)
    return out
