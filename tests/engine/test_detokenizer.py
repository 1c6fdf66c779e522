"""Incremental detokenization: whole characters only, deltas add up, stop-string search."""

from __future__ import annotations

import pytest

from fastserve_ray.engine import IncrementalDetokenizer
from fastserve_ray.engine.detokenizer import REPLACEMENT_CHAR, find_stop_string

MULTIBYTE = "héllo wörld ✓ 日本語 🙂 done"


def test_multibyte_text_streams_without_half_characters(tiny_tokenizer):
    ids = tiny_tokenizer.encode(MULTIBYTE)
    # The test only means something if some prefix of the tokens ends mid-character.
    assert any(tiny_tokenizer.decode(ids[:k]).endswith(REPLACEMENT_CHAR) for k in range(len(ids)))
    detok = IncrementalDetokenizer(tiny_tokenizer, tiny_tokenizer.encode("prompt:", add_bos=True))
    deltas = [detok.add_token(t) for t in ids]
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "" in deltas  # some tokens were held back until their character completed
    assert "".join(deltas) + detok.flush() == MULTIBYTE == detok.text


def test_flush_emits_an_incomplete_character_at_the_end(tiny_tokenizer):
    ids = tiny_tokenizer.encode("🙂")
    assert len(ids) > 1  # split across byte tokens
    detok = IncrementalDetokenizer(tiny_tokenizer)
    assert detok.add_token(ids[0]) == ""
    assert detok.flush() == tiny_tokenizer.decode(ids[:1])
    assert detok.flush() == ""  # nothing left


def test_special_tokens_add_no_text(tiny_tokenizer):
    detok = IncrementalDetokenizer(tiny_tokenizer)
    a = tiny_tokenizer.encode("ab")
    deltas = [detok.add_token(t) for t in [a[0], tiny_tokenizer.eos_id, *a[1:]]]
    assert "".join(deltas) == "ab" and deltas[1] == ""


def test_a_prompt_ending_mid_character_does_not_shift_the_first_delta(tiny_tokenizer):
    ids = tiny_tokenizer.encode("日")
    detok = IncrementalDetokenizer(tiny_tokenizer, prompt_token_ids=ids[:-1])
    deltas = [detok.add_token(t) for t in tiny_tokenizer.encode(" ok")]
    assert "".join(deltas) + detok.flush() == " ok"


@pytest.mark.parametrize(("text", "stops", "start", "expected"), [
    ("hello world", ["wor"], 0, 6),
    ("hello world", ["wor", "lo"], 0, 3),  # the earliest wins
    ("hello world", ["lo"], 4, 3),  # a match that straddles `start` is found
    ("hello world", ["lo"], 5, None),  # "lo" ends at 5: it was in the text already checked
    ("hello world", ["he"], 5, None),  # one that ended before `start` was already checked
    ("hello", ["xyz"], 0, None),
])
def test_find_stop_string(text, stops, start, expected):
    assert find_stop_string(text, stops, start) == expected
