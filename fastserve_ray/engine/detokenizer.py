"""Incremental detokenization that never emits half a character, and stop-string search.

Byte-level BPE splits a multi-byte UTF-8 character across tokens, so decoding the tokens seen
so far can end in U+FFFD ("replacement character") that the next token turns into a real
character. Text is therefore emitted only up to a clean end: a window of tokens whose decoded
text does not end in U+FFFD (vLLM's prefix/read offsets). Decoding a short window rather than
the whole output keeps each step O(window), and starting the window on the last few prompt
tokens keeps tokenizers whose pieces depend on their left context (SentencePiece's leading
space) right on the first output token.

``skip_special_tokens`` (default True) leaves special tokens' text out, as vLLM does by
default. ``StopStringText`` is one output's text with stop strings, EOS and the hold-back
(what ``RequestState`` does), plus vLLM's ``include_stop_str_in_output`` and
``skip_special_tokens``; the serving layer runs it for requests that set either.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastserve_ray.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
_NUM_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, for context only


class IncrementalDetokenizer:
    """Turns output token ids, one at a time, into text that grows only by whole characters."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # a prompt ending mid-character would shift the first delta
        self._ids = context
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(context)  # tokens before it are already in self.text
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

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
    match = find_stop_string_match(text, stops, start)
    return None if match is None else match[0]


def find_stop_string_match(text: str, stops: Sequence[str], start: int) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in ``text`` ending after ``start``.

    Of stop strings starting at the same index, the first in ``stops`` wins.
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        # A match ending after `start` begins at or after start - len(stop) + 1.
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best


class StopStringText:
    """One output's text, token by token: detokenized, cut at a stop string, held back.

    The same rules as the engine's own text: an EOS or stop token id adds no text, stop
    strings count only from ``min_tokens`` output tokens on, and while running the last
    (longest stop - 1) characters are held back, since they may start a stop string. On top:
    ``include_stop_str_in_output`` keeps the matched stop string (text after it is still cut)
    and the text of an EOS or stop token id, as vLLM does; ``skip_special_tokens=False`` keeps
    special tokens' text (stop strings are searched in that text).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str], *,
                 min_tokens: int = 0, include_stop_str_in_output: bool = False,
                 skip_special_tokens: bool = True) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                                  skip_special_tokens=skip_special_tokens)
        self.stop = tuple(stop)
        self.min_tokens = min_tokens
        self.include_stop_str_in_output = include_stop_str_in_output
        self._hold_back = max((len(s) for s in self.stop), default=1) - 1
        self._pending = ""
        self.num_tokens = 0
        self.stopped = False  # a stop string ended the text

    def add_token(self, token_id: int, finish_reason: str | None) -> bool:
        """Add one output token; True if a stop string ended the text with it.

        ``finish_reason`` is the engine's for this token: "stop" means it is an EOS or stop
        token id (its text is left out), any reason means the output ends here.
        """
        if self.stopped:
            return False
        self.num_tokens += 1
        # vLLM: include_stop_str_in_output also keeps the text of the EOS / stop token id.
        keep = finish_reason != "stop" or self.include_stop_str_in_output
        delta = self.detokenizer.add_token(token_id) if keep else ""
        if finish_reason is not None:
            delta += self.detokenizer.flush()
        checked = len(self._pending)
        self._pending += delta
        if not self.stop or self.num_tokens < self.min_tokens:
            return False
        match = find_stop_string_match(self._pending, self.stop, checked)
        if match is None:
            return False
        i, stop = match
        self._pending = self._pending[: i + len(stop) if self.include_stop_str_in_output else i]
        self.stopped = True
        return True

    def end(self) -> None:
        """The output ended without a token of its own (an abort): emit what is held back."""
        if not self.stopped:
            self._pending += self.detokenizer.flush()

    def take(self, finished: bool) -> str:
        """The text ready to hand out (all of it once ``finished`` or stopped)."""
        pending = self._pending
        visible = len(pending) if finished or self.stopped else len(pending) - self._hold_back
        if visible <= 0:
            return ""
        self._pending = pending[visible:]
        return pending[:visible]
