"""Incremental detokenization that never emits half a character, and stop-string search.

Byte-level BPE splits a multi-byte UTF-8 character across tokens, so decoding the tokens seen
so far can end in U+FFFD ("replacement character") that the next token turns into a real
character. Text is therefore emitted only up to a clean end: a window of tokens whose decoded
text does not end in U+FFFD (vLLM's prefix/read offsets). Decoding a short window rather than
the whole output keeps each step O(window), and starting the window on the last few prompt
tokens keeps tokenizers whose pieces depend on their left context (SentencePiece's leading
space) right on the first output token.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastserve_ray.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
_NUM_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, for context only


class IncrementalDetokenizer:
    """Turns output token ids, one at a time, into text that grows only by whole characters."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        context = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # a prompt ending mid-character would shift the first delta
        self._ids = context
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(context)  # tokens before it are already in self.text
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return ""  # e.g. a special token, or bytes still waiting for their character
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # hold back until the character completes (or the request ends)
        delta = new_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta

    def add_token(self, token_id: int) -> str:
        """Append one token; return the newly complete text (possibly "")."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The request ended: emit what is held back, even if it is an incomplete character."""
        return self._advance(final=True) if self._read_offset < len(self._ids) else ""


def find_stop_string(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index of the earliest stop string in ``text`` that ends after ``start``, or None."""
    best: int | None = None
    for stop in stops:
        # A match ending after `start` begins at or after start - len(stop) + 1.
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best
