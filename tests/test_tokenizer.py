"""Tokenizer: lossless byte-level round trip, save/load identity, foreign tokenizer.json, errors."""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from fastserve_ray.errors import TokenizerError
from fastserve_ray.tokenizer import (
    EOS,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    Tokenizer,
    file_sha256,
    train_tokenizer,
)

TRAIN_TEXTS = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:30]]
SPECIAL_SPELLINGS = [*SPECIAL_TOKENS, "<|endoftext|>", "</s>", "<s>", "<|", "|>"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer(TRAIN_TEXTS, vocab_size=400)


# Arbitrary Unicode, with the special tokens' spellings mixed in so they appear often.
texts = st.lists(st.one_of(st.text(), st.sampled_from(SPECIAL_SPELLINGS)), max_size=8).map("".join)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=texts)
def test_encode_decode_is_lossless(bpe: Tokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    # Text that spells a special token stays text: it can never forge a control token.
    assert bpe.eos_id not in ids and bpe.bos_id not in ids and bpe.pad_id not in ids
    assert all(0 <= i < bpe.vocab_size for i in ids)


def test_encode_batch_matches_encode(bpe: Tokenizer) -> None:
    batch = ["", "hello world", f"a{EOS}b", "ünïcödé ✓ 🐍", *TRAIN_TEXTS[:3]]
    assert bpe.encode_batch(batch) == [bpe.encode(t) for t in batch]


def test_special_ids_and_bos(bpe: Tokenizer) -> None:
    assert bpe.vocab_size == 400
    assert {bpe.bos_id, bpe.eos_id, bpe.pad_id} == {0, 1, 2}
    assert bpe.encode("x", add_bos=True)[0] == bpe.bos_id
    assert bpe.decode([bpe.bos_id, *bpe.encode("x"), bpe.eos_id]) == "x"


def test_train_save_load_round_trip(bpe: Tokenizer, tmp_path: Path) -> None:
    path = bpe.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(path)
    for text in [*TRAIN_TEXTS[:5], "def f(x):\n    return x ** 2  # ünïcode"]:
        assert loaded.encode(text) == bpe.encode(text)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    assert loaded.sha256() == file_sha256(path)
    # Saving the loaded tokenizer again writes identical bytes, so the sha256 is stable.
    again = loaded.save(tmp_path / "again.json")
    assert file_sha256(again) == loaded.sha256()
    # A directory holding tokenizer.json loads too.
    assert Tokenizer.load(tmp_path).sha256() == loaded.sha256()


def test_training_is_deterministic(tmp_path: Path) -> None:
    a = train_tokenizer(TRAIN_TEXTS[:10], vocab_size=300).save(tmp_path / "a.json")
    b = train_tokenizer(TRAIN_TEXTS[:10], vocab_size=300).save(tmp_path / "b.json")
    assert file_sha256(a) == file_sha256(b)


def test_foreign_wordlevel_tokenizer_json(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert tok.vocab_size == 5
    assert tok.encode("hello world planet") == [3, 4, 0]
    assert tok.encode_batch(["world hello"]) == [[4, 3]]


def test_foreign_bpe_tokenizer_json(tmp_path: Path) -> None:
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<|endoftext|>"], show_progress=False
    )
    hf.train_from_iterator(TRAIN_TEXTS[:5], trainer=trainer)
    hf.save(str(tmp_path / "gpt.json"))
    tok = Tokenizer.load(tmp_path / "gpt.json")
    assert tok.eos_id == tok.bos_id == hf.token_to_id("<|endoftext|>")
    ids = tok.encode("return the value")
    assert ids and tok.decode(ids).replace(" ", "") == "returnthevalue"


def test_vocab_size_too_small() -> None:
    with pytest.raises(TokenizerError, match=f"vocab_size=100 is too small.*{MIN_VOCAB_SIZE}"):
        train_tokenizer(["some text"], vocab_size=100)


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerError, match=f"{missing} does not exist"):
        Tokenizer.load(missing)
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'tokenizer.json'} does not exist"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "Nonsense"}}', ""])
def test_corrupt_tokenizer_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(TokenizerError, match=f"{path} is not a valid tokenizer.json"):
        Tokenizer.load(path)
