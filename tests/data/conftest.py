"""Shared fixtures and file factories for the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import SMALL_SEQ_LEN, SMALL_VOCAB

from fastserve_ray.data import builtin_documents, prepare_data
from fastserve_ray.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def small_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json with a small vocabulary, trained on the built-in docs."""
    tok = train_tokenizer((d.text for d in builtin_documents("docs")), SMALL_VOCAB)
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def small_tokenizer(small_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.load(small_tokenizer_path)


@pytest.fixture(scope="session")
def builtin_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus prepared once with a small vocabulary (BPE trained here)."""
    out = tmp_path_factory.mktemp("builtin") / "data"
    prepare_data(
        out, vocab_size=SMALL_VOCAB, seq_len=SMALL_SEQ_LEN, rows_per_shard=1000, progress=False
    )
    return out
