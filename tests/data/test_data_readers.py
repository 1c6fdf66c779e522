"""Readers and the built-in corpus: every input type, and every bad input's error message."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import write_jsonl, write_parquet

from fastserve_ray.data import BUILTIN_FLAVOURS, builtin_documents, iter_documents
from fastserve_ray.data.readers import read_txt_pieces
from fastserve_ray.errors import ConfigError, DataError


def _texts(inputs, **kw) -> list[tuple[int, str]]:
    return [(d.doc_id, d.text) for d in iter_documents(inputs, **kw)]


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("hello\nworld\n")
    docs = list(iter_documents([path]))
    assert [(d.doc_id, d.source, d.text) for d in docs] == [(0, str(path), "hello\nworld\n")]


def test_large_txt_comes_in_line_aligned_pieces_with_one_doc_id(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    lines = [f"line {i} " + "x" * (i % 50) + "\n" for i in range(2000)]
    path.write_text("".join(lines))
    pieces = list(read_txt_pieces(path, piece_chars=4096))
    assert len(pieces) > 10
    assert "".join(pieces) == "".join(lines)  # lossless
    assert all(p.endswith("\n") for p in pieces)  # cut at line boundaries
    assert all(len(p) < 4096 + 200 for p in pieces)


def test_default_txt_piece_size_and_shared_doc_id(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    line = "a" * 99 + "\n"
    path.write_text(line * 25_000)  # 2.5 MB
    docs = list(iter_documents([path, path]))
    assert [d.doc_id for d in docs] == [0, 0, 0, 1, 1, 1]
    assert all(len(d.text) <= (1 << 20) + 100 for d in docs)
    assert "".join(d.text for d in docs[:3]) == line * 25_000


def test_txt_line_longer_than_a_piece_is_cut_anyway(tmp_path: Path) -> None:
    path = tmp_path / "one_line.txt"
    path.write_text("y" * 10_000)
    pieces = list(read_txt_pieces(path, piece_chars=1000))
    assert "".join(pieces) == "y" * 10_000 and max(map(len, pieces)) <= 1000


def test_jsonl_one_document_per_line_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"body": "one", "id": 1}, {"body": ""}, {"body": "two"}])
    with open(path, "a") as f:
        f.write("\n")  # trailing blank line is fine
    assert _texts([path], text_field="body") == [(0, "one"), (1, "two")]


def test_parquet_text_column_nulls_skipped(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", ["alpha", None, "", "beta"])
    assert _texts([path]) == [(0, "alpha"), (1, "beta")]


def test_parquet_many_batches(tmp_path: Path) -> None:
    texts = [f"doc {i}" for i in range(1000)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(1000))}), path, row_group_size=100)
    assert [t for _, t in _texts([path])] == texts


def test_folder_recursive_sorted_mixed_types(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "sea"}, {"text": "see"}])
    write_parquet(tmp_path / "sub" / "d.parquet", ["dee"])
    (tmp_path / "notes.md").write_text("ignored: not a supported type")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("ignored: hidden")
    assert _texts([tmp_path]) == [(0, "ay"), (1, "bee"), (2, "sea"), (3, "see"), (4, "dee")]


def test_builtin_docs_deterministic_and_nonempty() -> None:
    docs = list(builtin_documents("docs"))
    assert len(docs) > 50
    assert [d.doc_id for d in docs] == list(range(len(docs)))
    assert sum(len(d.text) for d in docs) > 200_000
    assert all(d.source.startswith("builtin:docs/") for d in docs)
    assert [d.text for d in builtin_documents()] == [d.text for d in docs]


def test_builtin_docs_plus_code_adds_stdlib_sources() -> None:
    docs = list(builtin_documents("docs+code"))
    code = [d for d in docs if d.source.startswith("builtin:code/")]
    assert len(code) > 50
    assert any(d.source == "builtin:code/os.py" for d in code)
    assert [d.doc_id for d in docs] == list(range(len(docs)))


def test_builtin_unknown_flavour_names_choices() -> None:
    with pytest.raises(ConfigError, match=r"'poetry'.*docs, docs\+code"):
        builtin_documents("poetry")
    assert BUILTIN_FLAVOURS == ("docs", "docs+code")


# ---- errors: each names the file (and line / field) at fault -------------------------------


def _error(inputs, **kw) -> str:
    with pytest.raises(DataError) as info:
        list(iter_documents(inputs, **kw))
    return str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    assert str(missing) in _error([missing]) and "does not exist" in _error([missing])


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    msg = _error([path])
    assert str(path) in msg and "unsupported" in msg and ".jsonl" in msg


def test_folder_without_supported_files(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("1")
    msg = _error([tmp_path])
    assert str(tmp_path) in msg and "contains no" in msg


def test_jsonl_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    msg = _error([path])
    assert f"{path}:2" in msg and "not valid JSON" in msg


def test_jsonl_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, ["text", "x"]])
    msg = _error([path])
    assert f"{path}:2" in msg and "expected a JSON object" in msg and "list" in msg


def test_jsonl_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "nofield.jsonl", [{"content": "hi"}])
    msg = _error([path], text_field="body")
    assert f"{path}:1" in msg and "'body'" in msg and "'content'" in msg


def test_jsonl_text_not_a_string(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "num.jsonl", [{"text": "ok"}, {"text": "ok"}, {"text": 42}])
    msg = _error([path])
    assert f"{path}:3" in msg and "'text'" in msg and "must be a string" in msg and "int" in msg


def test_parquet_missing_column_names_file_column_and_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "cols.parquet", ["x"], column="content")
    msg = _error([path])
    assert str(path) in msg and "'text'" in msg and "content" in msg


def test_parquet_column_not_strings(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "ints.parquet", [1, 2, 3])
    msg = _error([path])
    assert str(path) in msg and "must hold strings" in msg


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet at all")
    msg = _error([path])
    assert str(path) in msg and "not a valid Parquet file" in msg


def test_invalid_utf8_txt(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    msg = _error([path])
    assert str(path) in msg and "UTF-8" in msg


def test_empty_corpus_names_inputs(tmp_path: Path) -> None:
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("")
    empty_jsonl = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    msg = _error([empty_txt, empty_jsonl])
    assert "empty corpus" in msg and str(empty_txt) in msg and str(empty_jsonl) in msg
