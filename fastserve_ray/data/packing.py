"""Documents → one token stream → fixed-length training rows, in bounded memory.

Each document's tokens are followed by the end-of-sequence id, the documents are
concatenated into one stream, and the stream is cut into rows of seq_len + 1
tokens that start every seq_len tokens: consecutive rows share one token, so the
target of the last position of a row is the input of the first position of the
next and no next-token pair is lost. The trailing partial row is dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from fractions import Fraction

import numpy as np

from fastserve_ray.data.readers import Document
from fastserve_ray.tokenizer import Tokenizer

# 64 KiB texts encode ~3x faster than 1 MiB ones (cache locality, and encode_batch
# spreads them over cores), while a batch's transient Rust encodings cost a few hundred
# bytes per token: texts are cut into parts of ENCODE_PART_CHARS and encoded
# ENCODE_BATCH_CHARS at a time (~80 MB peak on top of the interpreter).
ENCODE_PART_CHARS = 1 << 16
ENCODE_BATCH_CHARS = 1 << 19


def split_for_encoding(text: str, max_chars: int = ENCODE_PART_CHARS) -> list[str]:
    """Cut ``text`` into parts of at most ``max_chars``, after a newline or before a space.

    Byte-level BPE pre-tokenizes at those places anyway, so the parts encode to
    (nearly always exactly) the tokens of the whole text.
    """
    parts = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start, end) + 1
        if cut <= start:
            cut = text.rfind(" ", start + 1, end)
        if cut <= start:
            cut = end
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


def encode_documents(
    tokenizer: Tokenizer, documents: Iterable[Document], eos_id: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens int32, doc_id int64 per token) blocks of the concatenated stream.

    Pieces that share a doc_id are one document: ``eos_id`` follows its last piece.
    """
    segments: list[tuple[int, str | None]] = []  # (doc_id, text); None stands for eos
    num_chars = 0
    prev_doc = None
    for doc in documents:
        if prev_doc is not None and doc.doc_id != prev_doc:
            segments.append((prev_doc, None))
        prev_doc = doc.doc_id
        for part in split_for_encoding(doc.text):
            segments.append((doc.doc_id, part))
            num_chars += len(part)
            if num_chars >= ENCODE_BATCH_CHARS:
                yield _encode_segments(tokenizer, segments, eos_id)
                segments, num_chars = [], 0
    if prev_doc is not None:
        segments.append((prev_doc, None))
    if segments:
        yield _encode_segments(tokenizer, segments, eos_id)


def _encode_segments(
    tokenizer: Tokenizer, segments: list[tuple[int, str | None]], eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    encoded = iter(tokenizer.encode_batch([t for _, t in segments if t is not None]))
    ids = [next(encoded) if text is not None else [eos_id] for _, text in segments]
    lengths = [len(x) for x in ids]
    total = sum(lengths)
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=total)
    doc_ids = np.repeat(np.array([d for d, _ in segments], dtype=np.int64), lengths)
    return tokens, doc_ids


class RowPacker:
    """Cut a token stream, fed in blocks, into rows of seq_len + 1 overlapping by one token."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.row_len = seq_len + 1
        # The unfinished tail of the stream: always shorter than one row plus a block.
        self._tokens = np.empty(0, dtype=np.int32)
        self._doc_ids = np.empty(0, dtype=np.int64)

    def add(self, tokens: np.ndarray, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append a block; return the rows it completes (n, row_len) and their first doc_ids."""
        tokens = np.concatenate([self._tokens, tokens])
        doc_ids = np.concatenate([self._doc_ids, doc_ids])
        num_rows = max(0, (len(tokens) - 1) // self.seq_len) if len(tokens) >= self.row_len else 0
        starts = np.arange(num_rows, dtype=np.int64) * self.seq_len  # (n,)
        rows = tokens[starts[:, None] + np.arange(self.row_len)]  # (n, row_len)
        row_doc_ids = doc_ids[starts]
        # The next row starts where this one's last token is: keep it as the overlap.
        keep = num_rows * self.seq_len
        self._tokens, self._doc_ids = tokens[keep:].copy(), doc_ids[keep:].copy()
        return rows, row_doc_ids


def validation_mask(first_row: int, num_rows: int, val_fraction: float) -> np.ndarray:
    """Which of rows first_row .. first_row+num_rows-1 go to validation (deterministic).

    Row i is a validation row when floor((i+1)·f) > floor(i·f): exactly a fraction f of
    the rows, spread evenly; for f = 1/k that is every row with i % k == k-1.
    """
    frac = Fraction(val_fraction).limit_denominator(1_000_000)
    idx = np.arange(first_row, first_row + num_rows, dtype=np.int64)
    return ((idx + 1) * frac.numerator) // frac.denominator > (
        idx * frac.numerator
    ) // frac.denominator
