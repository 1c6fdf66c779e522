"""Ray Data round trip: ray_dataset reads back exactly the rows read_split returns."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import SMALL_SEQ_LEN, sample_texts

from fastserve_ray.data import prepare_data, ray_dataset, read_split, split_files
from fastserve_ray.errors import DataError

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # so rows can be compared in order
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


def _stack(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    # Ray gives a fixed_size_list column in numpy batches as an object array of 1-D arrays.
    tokens = np.stack([row for b in batches for row in b["tokens"]])
    doc_ids = np.concatenate([b["doc_id"] for b in batches])
    return tokens, doc_ids


@pytest.mark.parametrize("split", ["train", "validation"])
def test_ray_dataset_matches_read_split(ray_session, builtin_data_dir: Path, split: str) -> None:
    ds = ray_dataset(builtin_data_dir, split)
    expected = read_split(builtin_data_dir, split)
    if split == "train":
        assert len(split_files(builtin_data_dir, split)) > 1  # rows span several shards
    assert ds.count() == len(expected) > 0
    tokens, doc_ids = _stack(list(ds.iter_batches(batch_size=64, batch_format="numpy")))
    assert tokens.dtype == np.int32 and tokens.shape == expected.shape
    assert np.array_equal(tokens, expected)
    assert np.all(np.diff(doc_ids) >= 0)  # doc ids rise through the stream


def test_ray_torch_batches_are_2d_int32(ray_session, builtin_data_dir: Path) -> None:
    batch = next(iter(ray_dataset(builtin_data_dir).iter_torch_batches(batch_size=8)))
    assert batch["tokens"].dtype == torch.int32
    assert batch["tokens"].shape == (8, SMALL_SEQ_LEN + 1)
    assert np.array_equal(batch["tokens"].numpy(), read_split(builtin_data_dir)[:8])


def test_ray_dataset_empty_split_is_a_clear_error(
    tmp_path: Path, small_tokenizer_path: Path
) -> None:
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(sample_texts(20)))
    out = tmp_path / "out"
    prepare_data(out, [inp], tokenizer_path=small_tokenizer_path, val_fraction=0, progress=False)
    with pytest.raises(DataError, match=f"split 'validation' of data directory {out} has no rows"):
        ray_dataset(out, "validation")
