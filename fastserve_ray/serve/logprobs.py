"""Logprobs in OpenAI's shapes: token strings, their bytes, text offsets, the sampled token kept.

A token is often part of a character (byte-level BPE splits "é" into two tokens). Its string
is its bytes decoded where they are valid UTF-8 alone, else OpenAI's ``bytes:\\xNN`` spelling;
``bytes`` always carries the raw bytes, so a client can rebuild the text exactly.
Completions' ``text_offset`` is each token's character offset in the choice's text (after an
echoed prompt), counted with an incremental UTF-8 decoder so that a character split over
tokens is counted once. ``top_logprobs`` always contains the sampled token (as vLLM and
OpenAI's completions do): the k most likely, plus the sampled one when it is not among them.
"""

from __future__ import annotations

import codecs
from typing import Any


class TextOffsets:
    """One choice's running character count, advanced token by token."""

    def __init__(self, start: int = 0) -> None:
        self.position = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, data: bytes) -> int:
        """The offset of the token with these bytes; then move past it."""
        offset = self.position
        self.position += len(self._decoder.decode(data))
        return offset


class LogprobFormatter:
    """Formats the engine's TokenLogprobs for one tokenizer (None: token ids as strings)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> tuple[str, bytes]:
        """A token's string (OpenAI's spelling) and its raw bytes."""
        if self.tokenizer is None:
            text = str(token_id)
            return text, text.encode()
        data = self.tokenizer.token_bytes(token_id)
        try:
            return data.decode("utf-8"), data
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data), data

    def _in_text(self, token_id: int) -> bool:
        # Special tokens (EOS, ...) are left out of the text, so they take no characters.
        return self.tokenizer is None or not self.tokenizer.is_special(token_id)

    @staticmethod
    def _top(lp: Any) -> list[tuple[int, float]]:
        top = list(lp.top_logprobs)
        if top and all(t != lp.token_id for t, _ in top):
            top.append((lp.token_id, lp.logprob))
        return top

    def chat(self, lps: list[Any] | None) -> dict[str, Any] | None:
        """Chat's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
        if lps is None:
            return None
        content = []
        for lp in lps:
            text, data = self.token(lp.token_id)
            top = []
            for t, v in self._top(lp):
                t_text, t_data = self.token(t)
                top.append({"token": t_text, "logprob": v, "bytes": list(t_data)})
            content.append({"token": text, "logprob": lp.logprob, "bytes": list(data), "top_logprobs": top})
        return {"content": content}

    def completion(self, lps: list[Any] | None, offsets: TextOffsets,
                   prompt: tuple[list[int], list[Any]] | None = None) -> dict[str, Any] | None:
        """Completions' ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset.

        ``prompt``: (prompt ids, their logprobs) to put first (``echo`` with ``logprobs``); the
        first prompt token has null logprobs, as OpenAI gives it.
        """
        if lps is None and prompt is None:
            return None
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                     "text_offset": []}
        if prompt is not None:
            for token_id, lp in zip(*prompt):
                self._add(out, token_id, lp, offsets)
        for lp in lps or []:
            self._add(out, lp.token_id, lp, offsets)
        return out

    def _add(self, out: dict[str, list[Any]], token_id: int, lp: Any, offsets: TextOffsets) -> None:
        text, data = self.token(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offsets.advance(data) if self._in_text(token_id) else offsets.position)
        out["token_logprobs"].append(None if lp is None else lp.logprob)
        out["top_logprobs"].append(None if lp is None else {self.token(t)[0]: v for t, v in self._top(lp)})
