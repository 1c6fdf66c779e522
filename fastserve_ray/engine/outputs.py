"""What the engine hands back per request and step: tokens, text deltas, finish, timing.

Each step's output carries only what is new (``new_token_ids``, ``delta_text``,
``new_logprobs``), so producing it costs O(new tokens) however long the request has run. The
cumulative ``token_ids``, ``text`` and ``logprobs`` are read from the request's append-only
history when asked for: a consumer that streams deltas never pays for the whole history, and
one that reads the final output pays for it once. (Copying the history into every output, as
an earlier version did, made a request of n tokens cost O(n^2).)
"""

from __future__ import annotations

import dataclasses

from fastserve_ray.engine.sampler import TokenLogprobs


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """Timestamps (engine clock, time.monotonic by default) for TTFT, TPOT and JCT."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0  # times its KV was swapped out or dropped
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (latest admission)

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first output token (TTFT)."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def job_completion_time(self) -> float | None:
        """Seconds from arrival to finish (JCT)."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time


class OutputHistory:
    """One request's output so far, append-only: token ids, logprobs, and the text handed out.

    Outputs keep a reference plus their own lengths; since nothing is ever removed or
    rewritten, a prefix of the history is a stable snapshot of any earlier output.
    """

    __slots__ = ("token_ids", "logprobs", "_text_pieces", "_num_chars", "_joined")

    def __init__(self, with_logprobs: bool) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] | None = [] if with_logprobs else None
        self._text_pieces: list[str] = []  # the delta_text of each output, in order
        self._num_chars = 0
        # (pieces joined, their text): a cache, replaced as one tuple so that a reader on
        # another thread (the async engine's consumer) never sees half an update.
        self._joined: tuple[int, str] = (0, "")

    @property
    def num_chars(self) -> int:
        """Characters handed out so far."""
        return self._num_chars

    def add_text(self, piece: str) -> None:
        """Append text that has been handed out (it is never taken back)."""
        if piece:
            self._text_pieces.append(piece)
            self._num_chars += len(piece)

    def text(self, num_chars: int) -> str:
        """The first ``num_chars`` characters handed out (a snapshot of an earlier output)."""
        count, joined = self._joined
        if len(joined) < num_chars:
            pieces = self._text_pieces[count:]  # a copy: appends on the engine thread are safe
            joined += "".join(pieces)
            count += len(pieces)
            self._joined = (count, joined)
        return joined if len(joined) == num_chars else joined[:num_chars]


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One request's state after a step: what is new since its previous output, plus history.

    ``text`` never ends inside a multi-byte character, and while the request has stop strings it
    lags the tokens by up to (longest stop string - 1) characters, so that text already handed
    out never has to be taken back; both catch up when the request finishes. The text of an
    EOS or stop token id is not included (the token id is, in ``token_ids``); a stop string
    and everything after it is cut from the text.

    The cumulative ``token_ids``, ``text`` and ``logprobs`` are built on access (O(length) each
    time); per-step consumers should read the deltas.
    """

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]  # tokens sampled since the previous output of this request
    delta_text: str  # text added since the previous output: the deltas concatenate to `text`
    new_logprobs: list[TokenLogprobs] | None  # one per new token when logprobs were requested
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort" once finished
    metrics: RequestMetrics
    index: int = 0  # which of the prompt's n samples (SamplingParams.n) this is
    num_output_tokens: int = 0  # output tokens so far
    num_text_chars: int = 0  # characters of `text` so far
    # With SamplingParams.prompt_logprobs, on the first and the final output: one entry per
    # prompt token (None for the first, which nothing predicts).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    _history: OutputHistory | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def token_ids(self) -> list[int]:
        """Every output token so far (a fresh list)."""
        if self._history is None:
            return list(self.new_token_ids)
        return self._history.token_ids[: self.num_output_tokens]

    @property
    def text(self) -> str:
        """Every output character handed out so far."""
        if self._history is None:
            return self.delta_text
        return self._history.text(self.num_text_chars)

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        """One entry per output token so far when logprobs were requested, else None."""
        if self._history is None or self._history.logprobs is None:
            return None if self.new_logprobs is None else list(self.new_logprobs)
        return self._history.logprobs[: self.num_output_tokens]

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds between output tokens after the first (TPOT)."""
        m = self.metrics
        if m.first_token_time is None or m.last_token_time is None or self.num_output_tokens < 2:
            return None
        return (m.last_token_time - m.first_token_time) / (self.num_output_tokens - 1)
