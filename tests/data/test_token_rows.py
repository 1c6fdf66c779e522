"""Random row access from the .tokens files, storage helpers, and the background prefetcher."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from fastserve_ray import storage
from fastserve_ray.data import read_split
from fastserve_ray.data.token_rows import TokenRows
from fastserve_ray.errors import DataError
from fastserve_ray.train.prefetch import Prefetcher


def test_take_returns_exactly_the_parquet_rows(builtin_data_dir: Path) -> None:
    expected = read_split(builtin_data_dir, "train")
    rows = TokenRows(builtin_data_dir, "train")
    assert len(rows) == len(expected) > 100
    rng = np.random.default_rng(0)
    indices = rng.permutation(len(rows))[:50]
    got = rows.take(indices)
    assert got.dtype == np.int64 and np.array_equal(got, expected[indices])
    # Rows across a shard boundary and the very last row.
    edge = np.array([0, len(rows) - 1, *np.arange(990, 1010) % len(rows)])
    assert np.array_equal(rows.take(edge), expected[edge])
    with pytest.raises(IndexError, match="outside the split"):
        rows.take(np.array([len(rows)]))
    rows.close()


def test_truncated_token_file_and_old_data_dir_are_named(builtin_data_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(builtin_data_dir, copy)
    manifest = json.loads((copy / "data_manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]
    tokens = copy / first["tokens_path"]
    tokens.write_bytes(tokens.read_bytes()[: 4 * 33 * 10])  # 10 rows left
    rows = TokenRows(copy, "train")
    with pytest.raises(DataError, match=r"shard-00000\.tokens is truncated"):
        rows.take(np.array([20]))
    for shard in manifest["splits"]["train"]["shards"]:
        shard.pop("tokens_path"), shard.pop("tokens_sha256")
    (copy / "data_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="prepared by an older version"):
        TokenRows(copy, "train")


def test_storage_helpers_on_local_paths(tmp_path: Path) -> None:
    assert not storage.is_uri(tmp_path) and storage.is_uri("s3://bucket/x")
    assert storage.join("s3://bucket/x/", "a", "b") == "s3://bucket/x/a/b"
    target = storage.join(str(tmp_path), "sub", "marker")
    storage.write_text(target, "hello")
    assert storage.is_file(target) and storage.read_bytes(target) == b"hello"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    from fastserve_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="run directory .* is not writable"):
        storage.check_writable(blocker / "below", "run directory")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("new")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    storage.publish_dir(src, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]


def test_prefetcher_yields_in_order_ahead_of_the_consumer_and_raises_errors() -> None:
    loaded: list[int] = []
    gate = threading.Event()

    def load(step: int) -> np.ndarray:
        loaded.append(step)
        if step == 7:
            raise ValueError("bad shard at step 7")
        return np.full(3, step)

    prefetch = Prefetcher(load, start=3, stop=10, depth=2)
    assert np.array_equal(prefetch.get(3), [3, 3, 3])
    gate.wait(0.5)  # time for the thread to run ahead (bounded by depth)
    assert max(loaded) <= 3 + 1 + 2  # never more than `depth` batches beyond the one consumed
    for step in (4, 5, 6):
        assert prefetch.get(step)[0] == step
    with pytest.raises(ValueError, match="bad shard at step 7"):
        prefetch.get(7)
    prefetch.close()
    with pytest.raises(RuntimeError, match="out of order"):
        other = Prefetcher(lambda s: np.zeros(1), 0, 5)
        try:
            other.get(1)
        finally:
            other.close()
