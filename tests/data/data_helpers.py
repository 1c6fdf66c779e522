"""File factories and sizes shared by the data-layer tests (imported by name, not a fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SMALL_VOCAB = 300
SMALL_SEQ_LEN = 32


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON value per line (objects normally; anything, to test errors)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, texts: list, column: str = "text") -> Path:
    """A Parquet file with one string column (or whatever type ``texts`` holds)."""
    pq.write_table(pa.table({column: texts}), path)
    return path


def sample_texts(n: int = 40) -> list[str]:
    """Varied short English-ish documents."""
    words = "the model reads data and learns to predict the next token in a stream".split()  # noqa: SIM905
    return [" ".join(words[(i + j) % len(words)] for j in range(5 + i % 17)) for i in range(n)]
