"""Data manifest: JSON round trip, integrity errors, and the data ↔ model fit checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_helpers import SMALL_SEQ_LEN, SMALL_VOCAB, sample_texts

from fastserve_ray.config import ModelConfig
from fastserve_ray.data import (
    DataManifest,
    check_data_fits_model,
    load_data_manifest,
    read_split,
    split_files,
)
from fastserve_ray.errors import DataError
from fastserve_ray.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture()
def data_copy(builtin_data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared built-in data, safe to damage."""
    return Path(shutil.copytree(builtin_data_dir, tmp_path / "data"))


def test_round_trip(builtin_data_dir: Path) -> None:
    manifest = load_data_manifest(builtin_data_dir)
    again = DataManifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest and again.row_len == SMALL_SEQ_LEN + 1


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"data directory {tmp_path / 'nope'} does not exist"):
        load_data_manifest(tmp_path / "nope")


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'data_manifest.json'} does not exist"):
        load_data_manifest(tmp_path)


def test_invalid_json(data_copy: Path) -> None:
    (data_copy / "data_manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=f"{data_copy / 'data_manifest.json'} is not valid JSON"):
        load_data_manifest(data_copy)


def test_missing_key(data_copy: Path) -> None:
    path = data_copy / "data_manifest.json"
    raw = json.loads(path.read_text())
    del raw["seq_len"]
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=f"{path}: missing key 'seq_len'"):
        load_data_manifest(data_copy)


def test_wrong_format_version(data_copy: Path) -> None:
    path = data_copy / "data_manifest.json"
    raw = json.loads(path.read_text())
    raw["format_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="unsupported format_version 99"):
        load_data_manifest(data_copy)


def test_missing_shard(data_copy: Path) -> None:
    shard = data_copy / "validation" / "shard-00000.parquet"
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard} is listed in .* but does not exist"):
        load_data_manifest(data_copy, verify=False)


def test_altered_shard(data_copy: Path) -> None:
    shard = data_copy / "train" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard} .*altered or truncated"):
        load_data_manifest(data_copy)
    load_data_manifest(data_copy, verify=False)  # hashing is what catches it


def test_truncated_shard(data_copy: Path) -> None:
    shard = data_copy / "train" / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match="altered or truncated"):
        load_data_manifest(data_copy)


def test_altered_tokenizer(data_copy: Path) -> None:
    with open(data_copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(DataError, match="tokenizer.json .*altered"):
        load_data_manifest(data_copy)


def test_split_files_and_unknown_split(builtin_data_dir: Path) -> None:
    files = split_files(builtin_data_dir, "train")
    assert files and all(Path(f).is_absolute() and Path(f).is_file() for f in files)
    with pytest.raises(DataError, match="unknown split 'test'.*train, validation"):
        read_split(builtin_data_dir, "test")


def test_fits_model(builtin_data_dir: Path) -> None:
    manifest = load_data_manifest(builtin_data_dir)
    tokenizer = Tokenizer.load(builtin_data_dir)
    config = ModelConfig(vocab_size=SMALL_VOCAB, max_seq_len=SMALL_SEQ_LEN, dim=64)
    check_data_fits_model(manifest, config, tokenizer)
    check_data_fits_model(manifest, config.replace(vocab_size=SMALL_VOCAB + 64))


def test_seq_len_longer_than_model(builtin_data_dir: Path) -> None:
    manifest = load_data_manifest(builtin_data_dir)
    config = ModelConfig(vocab_size=SMALL_VOCAB, max_seq_len=SMALL_SEQ_LEN - 1, dim=64)
    with pytest.raises(
        DataError, match=f"seq_len={SMALL_SEQ_LEN} .*max_seq_len={SMALL_SEQ_LEN - 1}"
    ):
        check_data_fits_model(manifest, config)


def test_vocab_larger_than_model(builtin_data_dir: Path) -> None:
    manifest = load_data_manifest(builtin_data_dir)
    config = ModelConfig(vocab_size=256, max_seq_len=SMALL_SEQ_LEN, dim=64)
    with pytest.raises(DataError, match=f"vocabulary mismatch.*{SMALL_VOCAB}.*vocab_size=256"):
        check_data_fits_model(manifest, config)


def test_different_tokenizer(builtin_data_dir: Path, tmp_path: Path) -> None:
    manifest = load_data_manifest(builtin_data_dir)
    config = ModelConfig(vocab_size=SMALL_VOCAB, max_seq_len=SMALL_SEQ_LEN, dim=64)
    other = train_tokenizer(sample_texts(100), SMALL_VOCAB)
    other = Tokenizer.load(other.save(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=f"tokenizer mismatch.*{tmp_path / 'tokenizer.json'}"):
        check_data_fits_model(manifest, config, other)
