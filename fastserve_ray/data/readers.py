"""Streaming readers for user corpora: .txt files, .jsonl, .parquet, or folders of them.

Nothing here reads a whole file into memory: text files come in ~1 MiB pieces
cut at line boundaries, JSONL one line at a time, Parquet one record batch at a
time. Every error is a DataError that names the file (and line or field) at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fastserve_ray.errors import DataError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
PIECE_CHARS = 1 << 20  # a big .txt file is yielded in pieces of about this many characters
_PARQUET_BATCH_ROWS = 256


@dataclass(frozen=True)
class Document:
    """One piece of text; the pieces of one large document share its doc_id."""

    doc_id: int
    source: str
    text: str


def resolve_inputs(inputs: Iterable[str | Path] | str | Path) -> list[Path]:
    """Expand folders (recursively, sorted) into supported files; DataError for bad paths."""
    if isinstance(inputs, (str, Path)):  # one path, not an iterable of its characters
        inputs = [inputs]
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"input path {path} does not exist")
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in SUPPORTED_SUFFIXES
                # Skip hidden files/folders (.git, editor swap files): never corpus text.
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(
                    f"input folder {path} contains no {', '.join(SUPPORTED_SUFFIXES)} files"
                )
            files.extend(found)
        elif path.suffix.lower() in SUPPORTED_SUFFIXES:
            files.append(path)
        else:
            raise DataError(
                f"unsupported input file {path}: expected a .txt, .jsonl or .parquet file "
                "(or a folder of them)"
            )
    return files


def iter_documents(
    inputs: Iterable[str | Path] | str | Path, text_field: str = "text"
) -> Iterator[Document]:
    """Stream the non-empty documents of ``inputs``, numbered from 0 in input order.

    A .txt file is one document (yielded in ~1 MiB pieces with the same doc_id); a
    JSONL line or a Parquet row is one document. Empty texts are skipped.
    """
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files = resolve_inputs(inputs)  # eager, so a bad path fails before any work is done
    doc_id = 0
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            num_pieces = 0
            for piece in read_txt_pieces(path):
                num_pieces += 1
                yield Document(doc_id, str(path), piece)
            if num_pieces:  # an empty file is no document
                doc_id += 1
            continue
        texts = (
            read_jsonl(path, text_field) if suffix == ".jsonl" else read_parquet(path, text_field)
        )
        for text in texts:
            if text:
                yield Document(doc_id, str(path), text)
                doc_id += 1
    if doc_id == 0:
        names = ", ".join(str(p) for p in inputs)
        raise DataError(f"empty corpus: no non-empty text found in {names}")


def read_txt_pieces(path: str | Path, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Yield a UTF-8 text file in pieces of about ``piece_chars`` cut after a newline."""
    path = Path(path)
    buf = ""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while chunk := f.read(piece_chars):
                buf += chunk
                if len(buf) < piece_chars:
                    continue
                cut = buf.rfind("\n") + 1
                # A single line longer than a piece has no line boundary to honour.
                cut = cut or len(buf)
                yield buf[:cut]
                buf = buf[cut:]
    except UnicodeDecodeError as e:
        raise DataError(f"input file {path} is not valid UTF-8 text: {e.reason}") from None
    if buf:
        yield buf


def read_jsonl(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the ``text_field`` string of each JSON object line (blank lines skipped)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                yield _jsonl_text(line, text_field, f"{path}:{lineno}")
    except UnicodeDecodeError as e:
        raise DataError(f"input file {path} is not valid UTF-8 text: {e.reason}") from None


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(map(repr, list(record)[:20])) or "none"
        raise DataError(f"{where}: no text field {text_field!r} (fields present: {keys})")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: text field {text_field!r} must be a string, got {type(text).__name__}"
        )
    return text


def read_parquet(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the ``text_field`` column of a Parquet file, one record batch at a time."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"input file {path} is not a valid Parquet file: {e}") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(
            f"Parquet file {path} has no column {text_field!r}; "
            f"its columns are {', '.join(schema.names) or 'none'}"
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(
            f"Parquet file {path}: column {text_field!r} must hold strings, got {column_type}"
        )
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text:  # null and empty rows carry no text
                yield text
