"""prepare_data: a corpus → tokenizer.json + Parquet token shards + data_manifest.json.

Two streaming passes over the documents (train the tokenizer, then encode), so
memory stays bounded whatever the corpus size. Everything is written into a
temporary sibling directory that is renamed into place at the end: a failure
leaves neither a half-written data directory nor the temporary one behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

from fastserve_ray.atomic import atomic_directory
from fastserve_ray.data.corpus import builtin_documents, builtin_source
from fastserve_ray.data.manifest import MANIFEST_NAME, TOKENIZER_NAME, DataManifest
from fastserve_ray.data.packing import RowPacker, encode_documents, validation_mask
from fastserve_ray.data.readers import Document, iter_documents, resolve_inputs
from fastserve_ray.data.shards import ShardWriter
from fastserve_ray.errors import ConfigError, DataError, TokenizerError
from fastserve_ray.storage import is_nonempty, is_uri, staged_output
from fastserve_ray.tokenizer import MIN_VOCAB_SIZE, Tokenizer, file_sha256, train_tokenizer


class _Progress:
    """Prints a status line on stderr at most every ``interval`` seconds."""

    def __init__(self, enabled: bool, interval: float = 2.0) -> None:
        self.enabled = enabled
        self.interval = interval
        self.start = self._last = time.monotonic()

    def say(self, message: str) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.start
            print(f"prepare-data: {message} ({elapsed:.1f} s)", file=sys.stderr, flush=True)

    def tick(self, message_fn: Callable[[], str]) -> None:
        if self.enabled and time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            self.say(message_fn())


def prepare_data(
    out_dir: str | Path,
    inputs: Sequence[str | Path] | str | Path | None = None,
    *,
    text_field: str = "text",
    vocab_size: int = 4096,
    seq_len: int = 256,
    tokenizer_path: str | Path | None = None,
    rows_per_shard: int = 4096,
    val_fraction: float = 0.05,
    builtin_flavour: str = "docs",
    overwrite: bool = False,
    progress: bool = True,
) -> DataManifest:
    """Tokenize ``inputs`` (None or empty: the built-in corpus) into a data directory.

    Trains a byte-level BPE tokenizer of ``vocab_size`` unless ``tokenizer_path`` is
    given (then that tokenizer.json is used and copied verbatim). Returns the manifest.
    """
    out_dir = out_dir if is_uri(out_dir) else Path(out_dir)  # s3://...: staged here, then uploaded
    if isinstance(inputs, (str, Path)):  # one path, not an iterable of its characters
        inputs = [inputs]
    _validate_args(seq_len, rows_per_shard, val_fraction, vocab_size, tokenizer_path)
    _check_out_dir(out_dir, overwrite)
    if inputs:
        resolve_inputs(inputs)  # fail on a bad path before any work is done
        sources = [os.path.abspath(p) for p in inputs]
    else:
        builtin_documents(builtin_flavour)  # fail on an unknown flavour now
        sources = [builtin_source(builtin_flavour)]

    def documents() -> Iterator[Document]:
        if inputs:
            return iter_documents(inputs, text_field)
        return builtin_documents(builtin_flavour)

    report = _Progress(progress)
    with staged_output(out_dir, last=MANIFEST_NAME) as target, atomic_directory(target) as stage:
        tokenizer = _make_tokenizer(documents, tokenizer_path, vocab_size, stage, report)
        manifest = _write_shards(
            documents(), tokenizer, stage, seq_len, rows_per_shard, val_fraction, report
        )
        manifest.tokenizer_sha256 = file_sha256(stage / TOKENIZER_NAME)
        manifest.sources = sources
        manifest.save(stage)
    report.say(
        f"wrote {out_dir}: {manifest.num_documents} documents, {manifest.num_tokens} tokens, "
        f"{manifest.splits['train'].num_rows} train + "
        f"{manifest.splits['validation'].num_rows} validation rows of {manifest.row_len} tokens"
    )
    return manifest


def _validate_args(
    seq_len: int,
    rows_per_shard: int,
    val_fraction: float,
    vocab_size: int,
    tokenizer_path: str | Path | None,
) -> None:
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    if rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer_path is None and vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + special tokens)"
        )


def _check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    if is_uri(out_dir):
        if not overwrite and is_nonempty(out_dir):
            raise DataError(f"output directory {out_dir} already exists and is not empty; "
                            "choose another path or pass overwrite=True (--overwrite)")
        return
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"output path {out_dir} exists and is not a directory")
    if not overwrite and any(out_dir.iterdir()):
        raise DataError(
            f"output directory {out_dir} already exists and is not empty; "
            "choose another path or pass overwrite=True (--overwrite)"
        )


def _make_tokenizer(
    documents: Callable[[], Iterator[Document]],
    tokenizer_path: str | Path | None,
    vocab_size: int,
    stage: Path,
    report: _Progress,
) -> Tokenizer:
    """Load or train the tokenizer and write it to stage/tokenizer.json."""
    if tokenizer_path is not None:
        tokenizer = Tokenizer.load(tokenizer_path)
        # A verbatim copy keeps the file's sha256, so a model dir holding the same
        # tokenizer.json matches the manifest.
        shutil.copyfile(tokenizer.path, stage / TOKENIZER_NAME)
        tokenizer.write_side_files(stage)  # its chat template etc., when it has them
    else:
        report.say(f"training a byte-level BPE tokenizer (vocab_size={vocab_size})")
        count = 0

        def status() -> str:
            return f"training the tokenizer: {count} documents/pieces read"

        def texts() -> Iterator[str]:
            nonlocal count
            for doc in documents():
                count += 1
                report.tick(status)
                yield doc.text

        tokenizer = train_tokenizer(texts(), vocab_size)
        tokenizer.save(stage / TOKENIZER_NAME)
    if tokenizer.eos_id is None:
        raise TokenizerError(
            f"tokenizer {tokenizer_path} has no end-of-sequence token (looked for <|eos|>, </s>, "
            "<|endoftext|>, ...): documents could not be separated"
        )
    return tokenizer


def _write_shards(
    documents: Iterator[Document],
    tokenizer: Tokenizer,
    stage: Path,
    seq_len: int,
    rows_per_shard: int,
    val_fraction: float,
    report: _Progress,
) -> DataManifest:
    """Encode, pack and split rows into Parquet shards; the manifest lacks sha/sources."""
    packer = RowPacker(seq_len)
    writers = {
        name: ShardWriter(stage, name, packer.row_len, rows_per_shard)
        for name in ("train", "validation")
    }
    num_tokens = num_rows = 0
    last_doc = -1
    num_documents = 0

    def status() -> str:
        num_shards = sum(len(w.info.shards) for w in writers.values())
        return (
            f"{num_documents} documents, {num_tokens} tokens, {num_rows} rows, "
            f"{num_shards} shards written"
        )

    for tokens, doc_ids in encode_documents(tokenizer, documents, tokenizer.eos_id):
        num_tokens += len(tokens)
        # doc_ids rise through the stream, so counting changes counts documents.
        num_documents += int((doc_ids[1:] != doc_ids[:-1]).sum()) + int(doc_ids[0] != last_doc)
        last_doc = int(doc_ids[-1])
        rows, row_doc_ids = packer.add(tokens, doc_ids)
        is_val = validation_mask(num_rows, len(rows), val_fraction)
        writers["train"].add(rows[~is_val], row_doc_ids[~is_val])
        writers["validation"].add(rows[is_val], row_doc_ids[is_val])
        num_rows += len(rows)
        report.tick(status)
    splits = {name: writer.close() for name, writer in writers.items()}
    if num_rows == 0:
        raise DataError(
            f"the corpus has only {num_tokens} tokens (end-of-document tokens included), "
            f"fewer than one row of seq_len + 1 = {seq_len + 1}; use a smaller seq_len or more text"
        )
    return DataManifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tokenizer_sha256="",
        vocab_size=tokenizer.vocab_size,
        seq_len=seq_len,
        eos_id=tokenizer.eos_id,
        num_documents=num_documents,
        num_tokens=num_tokens,
        sources=[],
        splits=splits,
    )
