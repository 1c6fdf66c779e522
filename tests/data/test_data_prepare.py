"""prepare_data: manifest, shard schema, row packing, split, determinism, atomicity, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import SMALL_SEQ_LEN, SMALL_VOCAB, sample_texts, write_jsonl, write_parquet
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from fastserve_ray.data import load_data_manifest, prepare_data, read_split
from fastserve_ray.data.packing import RowPacker, split_for_encoding, validation_mask
from fastserve_ray.errors import ConfigError, DataError, TokenizerError
from fastserve_ray.tokenizer import Tokenizer, file_sha256

MANIFEST_KEYS = {
    "format_version",
    "created",
    "tokenizer_sha256",
    "vocab_size",
    "seq_len",
    "row_len",
    "eos_id",
    "num_documents",
    "num_tokens",
    "sources",
    "splits",
}


def _all_rows_in_order(data_dir: Path, val_fraction: float) -> np.ndarray:
    """Re-interleave train and validation rows into stream order via the split rule."""
    train, val = read_split(data_dir, "train"), read_split(data_dir, "validation")
    is_val = validation_mask(0, len(train) + len(val), val_fraction)
    rows = np.empty((len(is_val), train.shape[1]), dtype=np.int32)
    rows[~is_val], rows[is_val] = train, val
    return rows


def _expected_stream(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text) + [tokenizer.eos_id]
    return stream


def test_builtin_manifest_and_shard_schema(builtin_data_dir: Path) -> None:
    raw = json.loads((builtin_data_dir / "data_manifest.json").read_text())
    assert set(raw) == MANIFEST_KEYS
    assert raw["seq_len"] == SMALL_SEQ_LEN and raw["row_len"] == SMALL_SEQ_LEN + 1
    assert raw["vocab_size"] == SMALL_VOCAB and raw["sources"] == ["builtin:docs"]
    assert raw["num_documents"] > 50
    assert raw["tokenizer_sha256"] == file_sha256(builtin_data_dir / "tokenizer.json")
    tokenizer = Tokenizer.load(builtin_data_dir)
    assert raw["eos_id"] == tokenizer.eos_id
    for split in ("train", "validation"):
        info = raw["splits"][split]
        assert info["num_rows"] == sum(s["num_rows"] for s in info["shards"]) > 0
        for shard in info["shards"]:
            assert set(shard) == {"path", "num_rows", "sha256", "tokens_path", "tokens_sha256"}
            assert shard["path"].startswith(f"{split}/shard-")
            table = pq.read_table(builtin_data_dir / shard["path"])
            # The raw token file holds exactly the Parquet rows, fixed-width little-endian int32.
            raw_rows = np.fromfile(builtin_data_dir / shard["tokens_path"], dtype="<i4")
            assert np.array_equal(raw_rows.reshape(-1, SMALL_SEQ_LEN + 1),
                                  table.column("tokens").combine_chunks().flatten().to_numpy()
                                  .reshape(-1, SMALL_SEQ_LEN + 1))
            assert shard["tokens_sha256"] == file_sha256(builtin_data_dir / shard["tokens_path"])
            assert table.schema.field("tokens").type == pa.list_(pa.int32(), SMALL_SEQ_LEN + 1)
            assert table.schema.field("doc_id").type == pa.int64()
            assert table.num_rows == shard["num_rows"]
    manifest = load_data_manifest(builtin_data_dir)
    assert manifest.to_dict() == raw


def test_builtin_rows_overlap_by_one_token_and_split_fraction(builtin_data_dir: Path) -> None:
    manifest = load_data_manifest(builtin_data_dir)
    rows = _all_rows_in_order(builtin_data_dir, 0.05)
    assert rows.shape[1] == SMALL_SEQ_LEN + 1
    assert np.array_equal(rows[:-1, -1], rows[1:, 0])  # consecutive rows share one token
    num_val = manifest.splits["validation"].num_rows
    assert num_val == len(rows) // 20  # rows 19, 39, ... go to validation
    # Every next-token pair of the stream is present; the trailing partial row is dropped.
    assert len(rows) == (manifest.num_tokens - 1) // SMALL_SEQ_LEN
    assert rows.max() < manifest.vocab_size and rows.min() >= 0
    assert (rows == manifest.eos_id).sum() >= manifest.num_documents - 1


def test_token_stream_matches_encoding_docs_plus_eos(
    tmp_path: Path, small_tokenizer: Tokenizer, small_tokenizer_path: Path
) -> None:
    texts = sample_texts(60)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "out"
    manifest = prepare_data(
        out,
        [inp],
        tokenizer_path=small_tokenizer_path,
        seq_len=8,
        val_fraction=0.0,
        progress=False,
    )
    stream = _expected_stream(small_tokenizer, texts)
    rows = read_split(out, "train")
    assert manifest.num_tokens == len(stream) and manifest.num_documents == len(texts)
    assert read_split(out, "validation").shape == (0, 9)
    assert manifest.splits["validation"].shards == []
    assert len(rows) == (len(stream) - 1) // 8
    for i, row in enumerate(rows):
        assert row.tolist() == stream[i * 8 : i * 8 + 9]
    # doc_id is the document of the row's first token.
    doc_of_token = np.repeat(
        np.arange(len(texts)), [len(small_tokenizer.encode(t)) + 1 for t in texts]
    )
    doc_ids = pq.read_table(out / "train" / "shard-00000.parquet").column("doc_id").to_numpy()
    assert np.array_equal(doc_ids, doc_of_token[np.arange(len(rows)) * 8])
    # The tokenizer file is copied verbatim, so its sha256 is the given file's.
    assert manifest.tokenizer_sha256 == file_sha256(small_tokenizer_path)
    assert manifest.sources == [str(inp.resolve())]


def test_txt_jsonl_parquet_inputs_together(tmp_path: Path, small_tokenizer_path: Path) -> None:
    texts = sample_texts(30)
    (tmp_path / "a.txt").write_text("\n".join(texts[:10]))
    write_jsonl(tmp_path / "b.jsonl", [{"content": t} for t in texts[10:20]])
    write_parquet(tmp_path / "c.parquet", texts[20:], column="content")
    # A txt file has no text field; the field name applies to jsonl and parquet.
    manifest = prepare_data(
        tmp_path / "out",
        [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"],
        text_field="content",
        tokenizer_path=small_tokenizer_path,
        seq_len=4,
        val_fraction=0.25,
        progress=False,
    )
    assert manifest.num_documents == 1 + 10 + 10
    train, val = read_split(tmp_path / "out"), read_split(tmp_path / "out", "validation")
    assert len(val) == (len(train) + len(val)) // 4


def test_shard_count_is_ceil_rows_over_rows_per_shard(
    tmp_path: Path, small_tokenizer_path: Path
) -> None:
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(sample_texts(200)))
    manifest = prepare_data(
        tmp_path / "out",
        [inp],
        tokenizer_path=small_tokenizer_path,
        seq_len=4,
        rows_per_shard=7,
        val_fraction=0.1,
        progress=False,
    )
    for name, split in manifest.splits.items():
        assert split.num_rows > 7
        assert len(split.shards) == math.ceil(split.num_rows / 7), name
        assert all(s.num_rows == 7 for s in split.shards[:-1])
        assert [s.path for s in split.shards] == [
            f"{name}/shard-{i:05d}.parquet" for i in range(len(split.shards))
        ]
    rows = _all_rows_in_order(tmp_path / "out", 0.1)
    assert np.array_equal(rows[:-1, -1], rows[1:, 0])


def test_two_runs_give_identical_shards(tmp_path: Path) -> None:
    kw = dict(vocab_size=SMALL_VOCAB, seq_len=16, rows_per_shard=500, progress=False)
    a = prepare_data(tmp_path / "a", **kw)
    b = prepare_data(tmp_path / "b", **kw)
    assert a.tokenizer_sha256 == b.tokenizer_sha256
    assert a.to_dict()["splits"] == b.to_dict()["splits"]
    assert a.splits["validation"].num_rows > 0


def test_progress_lines_on_stderr(
    tmp_path: Path, small_tokenizer_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(sample_texts(50)))
    prepare_data(tmp_path / "quiet", [inp], tokenizer_path=small_tokenizer_path, progress=False)
    assert capsys.readouterr().err == ""
    prepare_data(tmp_path / "loud", [inp], tokenizer_path=small_tokenizer_path, seq_len=8)
    err = capsys.readouterr().err
    assert "prepare-data:" in err and "rows" in err


def test_overwrite(tmp_path: Path, small_tokenizer_path: Path) -> None:
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(sample_texts(50)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match=f"{out}.*not empty"):
        prepare_data(out, [inp], tokenizer_path=small_tokenizer_path, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    prepare_data(out, [inp], tokenizer_path=small_tokenizer_path, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists()
    load_data_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]


def test_existing_empty_out_dir_is_fine(tmp_path: Path, small_tokenizer_path: Path) -> None:
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(sample_texts(50)))
    (tmp_path / "out").mkdir()
    prepare_data(tmp_path / "out", [inp], tokenizer_path=small_tokenizer_path, progress=False)
    load_data_manifest(tmp_path / "out")


def test_failure_leaves_nothing_behind(tmp_path: Path, small_tokenizer_path: Path) -> None:
    # The bad line comes after good ones, so the failure happens mid-way through writing.
    records = [{"text": t} for t in sample_texts(300)] + [{"text": 5}]
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(DataError, match="in.jsonl:301"):
        prepare_data(
            parent / "out",
            [inp],
            tokenizer_path=small_tokenizer_path,
            seq_len=4,
            rows_per_shard=5,
            progress=False,
        )
    assert list(parent.iterdir()) == []
    # Same when the tokenizer is being trained (first pass fails).
    with pytest.raises(DataError, match="in.jsonl:301"):
        prepare_data(parent / "out", [inp], vocab_size=SMALL_VOCAB, progress=False)
    assert list(parent.iterdir()) == []


def test_too_few_tokens_for_one_row(tmp_path: Path, small_tokenizer_path: Path) -> None:
    inp = tmp_path / "tiny.txt"
    inp.write_text("hi")
    with pytest.raises(DataError, match=r"only \d+ tokens.*seq_len \+ 1 = 1025"):
        prepare_data(
            tmp_path / "out",
            [inp],
            tokenizer_path=small_tokenizer_path,
            seq_len=1024,
            progress=False,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]


def test_empty_corpus(tmp_path: Path) -> None:
    inp = tmp_path / "empty.txt"
    inp.write_text("")
    with pytest.raises(DataError, match=f"empty corpus.*{inp}"):
        prepare_data(tmp_path / "out", [inp], vocab_size=SMALL_VOCAB, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"seq_len": 0}, ConfigError, "seq_len must be >= 1, got 0"),
        ({"rows_per_shard": 0}, ConfigError, "rows_per_shard must be >= 1"),
        ({"val_fraction": 1.0}, ConfigError, r"val_fraction must be in \[0, 1\), got 1.0"),
        ({"val_fraction": -0.1}, ConfigError, "val_fraction"),
        ({"vocab_size": 100}, TokenizerError, "vocab_size=100 is too small"),
        ({"builtin_flavour": "poems"}, ConfigError, "'poems'"),
        ({"inputs": ["/no/such/file.txt"]}, DataError, "/no/such/file.txt does not exist"),
        ({"tokenizer_path": "/no/tok.json"}, TokenizerError, "/no/tok.json"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        prepare_data(tmp_path / "out", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


# ---- packing helpers ------------------------------------------------------------------------


def test_row_packer_across_blocks() -> None:
    packer = RowPacker(seq_len=3)
    stream = np.arange(23, dtype=np.int32)
    rows, docs = [], []
    for block in np.array_split(stream, [1, 2, 7, 8, 15]):
        r, d = packer.add(block, block.astype(np.int64) // 5)
        rows.append(r)
        docs.append(d)
    rows, docs = np.concatenate(rows), np.concatenate(docs)
    assert rows.tolist() == [list(range(s, s + 4)) for s in range(0, 19, 3)]
    assert docs.tolist() == [s // 5 for s in range(0, 19, 3)]


def test_validation_mask_deterministic_and_blockwise() -> None:
    full = validation_mask(0, 100, 0.05)
    assert np.flatnonzero(full).tolist() == [19, 39, 59, 79, 99]
    pieces = np.concatenate([validation_mask(s, 10, 0.05) for s in range(0, 100, 10)])
    assert np.array_equal(full, pieces)
    assert not validation_mask(0, 50, 0.0).any()
    assert validation_mask(0, 1000, 0.3).sum() == 300


def test_split_for_encoding_is_lossless_and_bounded() -> None:
    text = ("word " * 30 + "\n") * 200 + "x" * 500
    parts = split_for_encoding(text, max_chars=100)
    assert "".join(parts) == text and max(map(len, parts)) <= 100
    assert split_for_encoding("short", max_chars=100) == ["short"]


def test_relative_out_dir_and_single_path_input(
    tmp_path: Path, small_tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("in.txt").write_text("\n".join(sample_texts(50)))
    manifest = prepare_data(
        "data", "in.txt", tokenizer_path=small_tokenizer_path, seq_len=8, progress=False
    )
    assert manifest.num_documents == 1 and manifest.sources == [str(tmp_path / "in.txt")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in.txt"]
    Path("probe").mkdir()  # the data dir has ordinary permissions, not mkdtemp's 0700
    assert (tmp_path / "data").stat().st_mode == Path("probe").stat().st_mode
    load_data_manifest("data")


def test_tokenizer_without_eos_is_refused(tmp_path: Path) -> None:
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_path = tmp_path / "wordlevel.json"
    hf.save(str(tok_path))
    inp = tmp_path / "in.txt"
    inp.write_text("the the the")
    with pytest.raises(TokenizerError, match=f"{tok_path} has no end-of-sequence token"):
        prepare_data(tmp_path / "out", [inp], tokenizer_path=tok_path, seq_len=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_foreign_tokenizer_with_eos(tmp_path: Path) -> None:
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "the": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["</s>"])
    tok_path = tmp_path / "wordlevel.json"
    hf.save(str(tok_path))
    write_jsonl(tmp_path / "in.jsonl", [{"text": "the the"}, {"text": "the cat"}])
    m = prepare_data(
        tmp_path / "out",
        [tmp_path / "in.jsonl"],
        tokenizer_path=tok_path,
        seq_len=2,
        val_fraction=0,
        progress=False,
    )
    assert (m.eos_id, m.vocab_size, m.num_tokens) == (1, 3, 6)
    assert read_split(tmp_path / "out").tolist() == [[2, 2, 1], [1, 2, 0]]
