"""The data manifest: what a prepared data directory holds, and checks that it is intact.

A data directory looks like::

    data_manifest.json        this manifest (JSON)
    tokenizer.json            the tokenizer the rows were encoded with
    train/shard-00000.parquet rows: tokens fixed_size_list<int32>[row_len], doc_id int64
    train/shard-00000.tokens  the same rows as raw little-endian int32, row_len per row
                              (random row access for training workers)
    validation/shard-00000.parquet
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastserve_ray import storage
from fastserve_ray.config import ModelConfig
from fastserve_ray.errors import DataError
from fastserve_ray.storage import is_uri
from fastserve_ray.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST_NAME = "data_manifest.json"
TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "validation")


@dataclass
class ShardInfo:
    """One shard: its Parquet and raw-token paths relative to the data directory, rows, sha256s."""

    path: str
    num_rows: int
    sha256: str
    tokens_path: str = ""  # "": prepared by a version that wrote Parquet only
    tokens_sha256: str = ""


@dataclass
class SplitInfo:
    """The rows of one split and the shards that hold them, in row order."""

    num_rows: int = 0
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class DataManifest:
    """Contents and lineage of a prepared data directory (data_manifest.json)."""

    tokenizer_sha256: str
    vocab_size: int
    seq_len: int
    eos_id: int
    num_documents: int
    num_tokens: int
    sources: list[str]
    splits: dict[str, SplitInfo]
    created: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def row_len(self) -> int:
        """Tokens per stored row: inputs are row[:-1], targets row[1:]."""
        return self.seq_len + 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to data_manifest.json."""
        return {
            "format_version": self.format_version,
            "created": self.created,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "row_len": self.row_len,
            "eos_id": self.eos_id,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "sources": list(self.sources),
            "splits": {name: dataclasses.asdict(split) for name, split in self.splits.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> DataManifest:
        """Parse the JSON form; DataError naming ``where`` and the key for anything malformed."""
        try:
            version = data["format_version"]
            if version != FORMAT_VERSION:
                raise DataError(
                    f"{where}: unsupported format_version {version!r} (this version reads "
                    f"{FORMAT_VERSION}); prepare the data again"
                )
            manifest = cls(
                format_version=version,
                created=str(data["created"]),
                tokenizer_sha256=str(data["tokenizer_sha256"]),
                vocab_size=int(data["vocab_size"]),
                seq_len=int(data["seq_len"]),
                eos_id=int(data["eos_id"]),
                num_documents=int(data["num_documents"]),
                num_tokens=int(data["num_tokens"]),
                sources=[str(s) for s in data["sources"]],
                splits={
                    name: SplitInfo(
                        num_rows=int(split["num_rows"]),
                        shards=[
                            ShardInfo(str(s["path"]), int(s["num_rows"]), str(s["sha256"]),
                                      str(s.get("tokens_path", "")), str(s.get("tokens_sha256", "")))
                            for s in split["shards"]
                        ],
                    )
                    for name, split in data["splits"].items()
                },
            )
        except KeyError as e:
            raise DataError(f"{where}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: malformed manifest ({e})") from None
        if "row_len" in data and data["row_len"] != manifest.row_len:
            raise DataError(
                f"{where}: row_len {data['row_len']} does not equal "
                f"seq_len + 1 = {manifest.row_len}"
            )
        return manifest

    def save(self, data_dir: str | Path) -> Path:
        """Write data_manifest.json into ``data_dir``."""
        path = Path(data_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def split(self, name: str) -> SplitInfo:
        """The split called ``name``; DataError naming the splits that exist otherwise."""
        if name not in self.splits:
            raise DataError(
                f"unknown split {name!r}; this data directory has {', '.join(self.splits)}"
            )
        return self.splits[name]


def load_data_manifest(data_dir: str | Path, verify: bool = True) -> DataManifest:
    """Read ``data_dir``/data_manifest.json; with ``verify``, check every file's sha256.

    ``data_dir`` may be a local path or an object-store URI (``s3://bucket/data``); remote
    files are hashed by streaming them, so verification never holds a shard in memory.
    """
    if is_uri(data_dir):
        return _load_manifest_at(str(data_dir), verify)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    return _load_manifest_at(str(data_dir), verify)


def _load_manifest_at(data_dir: str, verify: bool) -> DataManifest:
    path = storage.join(data_dir, MANIFEST_NAME)
    if not storage.is_file(path):
        if not storage.exists(data_dir):
            raise DataError(f"data directory {data_dir} does not exist")
        raise DataError(
            f"{path} does not exist: {data_dir} is not a prepared data directory "
            "(run `fastserve-ray prepare-data`)"
        )
    try:
        data = json.loads(storage.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(data).__name__}")
    manifest = DataManifest.from_dict(data, where=str(path))
    files = [(storage.join(data_dir, TOKENIZER_NAME), manifest.tokenizer_sha256)]
    for split in manifest.splits.values():
        for shard in split.shards:
            files.append((storage.join(data_dir, shard.path), shard.sha256))
            if shard.tokens_path:
                files.append((storage.join(data_dir, shard.tokens_path), shard.tokens_sha256))
    for file, sha in files:
        if not storage.is_file(file):
            raise DataError(f"{file} is listed in {path} but does not exist")
        if verify and storage.sha256(file) != sha:
            raise DataError(
                f"{file} does not match the sha256 recorded in {path}: "
                "it was altered or truncated; prepare the data again"
            )
    return manifest


def check_data_fits_model(
    manifest: DataManifest, model_config: ModelConfig, tokenizer: Tokenizer | None = None
) -> None:
    """DataError unless the data's rows, vocabulary and tokenizer fit ``model_config``."""
    if manifest.seq_len > model_config.max_seq_len:
        raise DataError(
            f"data seq_len={manifest.seq_len} is longer than the model's "
            f"max_seq_len={model_config.max_seq_len}; prepare the data with --seq-len "
            f"<= {model_config.max_seq_len} or raise max_seq_len"
        )
    if manifest.vocab_size > model_config.vocab_size:
        raise DataError(
            f"tokenizer/model vocabulary mismatch: the data's tokenizer has "
            f"{manifest.vocab_size} tokens but the model's vocab_size={model_config.vocab_size}"
        )
    if tokenizer is not None and tokenizer.sha256() != manifest.tokenizer_sha256:
        raise DataError(
            f"tokenizer mismatch: the data was encoded with tokenizer sha256 "
            f"{manifest.tokenizer_sha256[:12]}…, the given tokenizer"
            f"{f' ({tokenizer.path})' if tokenizer.path else ''} has {tokenizer.sha256()[:12]}…"
        )
