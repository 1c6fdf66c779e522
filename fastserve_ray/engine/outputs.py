"""What the engine hands back per request and step: tokens, text deltas, finish, timing."""

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


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One request's state after a step: everything so far plus what is new since the last one.

    ``text`` never ends inside a multi-byte character, and while the request has stop strings it
    lags the tokens by up to (longest stop string - 1) characters, so that text already handed
    out never has to be taken back; both catch up when the request finishes. The text of an
    EOS or stop token id is not included (the token id is, in ``token_ids``); a stop string
    and everything after it is cut from the text.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    text: str  # every output character so far
    new_token_ids: list[int]  # tokens sampled since the previous output of this request
    delta_text: str  # text added since the previous output: the deltas concatenate to `text`
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort" once finished
    logprobs: list[TokenLogprobs] | None  # one per output token when requested
    metrics: RequestMetrics
    index: int = 0  # which of the prompt's n samples (SamplingParams.n) this is

    @property
    def num_output_tokens(self) -> int:
        """Output tokens so far."""
        return len(self.token_ids)

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds between output tokens after the first (TPOT)."""
        m = self.metrics
        if m.first_token_time is None or m.last_token_time is None or len(self.token_ids) < 2:
            return None
        return (m.last_token_time - m.first_token_time) / (len(self.token_ids) - 1)
