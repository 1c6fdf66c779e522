"""One request's engine-side state: its sequence, random stream, text, stop strings, timing.

The scheduler's ``Sequence`` holds ids and cache bookkeeping; this holds what only the engine
front needs: the generator, the incremental detokenizer, the text handed out so far and
the timestamps a benchmark reads back.
"""

from __future__ import annotations

import torch

from fastserve_ray.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from fastserve_ray.engine.outputs import OutputHistory, RequestMetrics, RequestOutput
from fastserve_ray.engine.sampler import TokenLogprobs
from fastserve_ray.engine.sampling_params import SamplingParams
from fastserve_ray.engine.sequence import Sequence
from fastserve_ray.structured import GrammarMatcher
from fastserve_ray.tokenizer import Tokenizer


class RequestState:
    """Tracks one request from add_request to its final RequestOutput."""

    def __init__(
        self,
        request_id: str,
        seq: Sequence,
        tokenizer: Tokenizer | None,
        generator: torch.Generator | None,
        index: int = 0,
        matcher: GrammarMatcher | None = None,
    ) -> None:
        self.request_id = request_id
        self.matcher = matcher  # where the output is in its grammar (structured outputs)
        self.index = index  # which of the prompt's n samples
        self.seq = seq
        self.params: SamplingParams = seq.sampling_params
        self.generator = generator
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, seq.prompt_token_ids) if tokenizer else None
        )
        self.prompt_token_ids = seq.prompt_token_ids
        self.history = OutputHistory(with_logprobs=self.params.logprobs is not None)
        # Prompt logprobs (prompt_logprobs asked for): None for the first prompt token, which
        # nothing predicts, then one per prompt token as prefill computes them.
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if self.params.prompt_logprobs is not None else None)
        self._prompt_logprobs_sent = False
        # Text the detokenizer produced but not handed out yet: the last (longest stop - 1)
        # characters are held back while running, since they may turn out to start a stop
        # string. Stop strings are searched here only (a match can never begin in text already
        # handed out), so a step costs O(new text), not O(all text).
        self._pending_text = ""
        self._num_emitted_tokens = 0
        self._hold_back = max((len(s) for s in self.params.stop), default=1) - 1
        self.finish_reason: str | None = None
        assert seq.arrival_time is not None
        self.arrival_time = seq.arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def finished(self) -> bool:
        """Whether a finish reason is set."""
        return self.finish_reason is not None

    def on_scheduled(self, now: float) -> None:
        """Record the first time the request's tokens ran."""
        if self.first_scheduled_time is None:
            self.first_scheduled_time = now

    @property
    def output_token_ids(self) -> list[int]:
        """Every token sampled so far (the history's list itself, not a copy)."""
        return self.history.token_ids

    def on_token(
        self,
        token_id: int,
        logprobs: TokenLogprobs | None,
        now: float,
        finish_reason: str | None,
        completes: bool = False,
    ) -> bool:
        """Record a sampled token (the scheduler's finish reason, if any).

        ``completes``: the token completes the request's grammar, so the request ends ("stop")
        with the token's text kept. True if this ends the request here (a stop string, or
        ``completes``), i.e. where the scheduler does not know it yet.
        """
        history = self.history
        history.token_ids.append(token_id)
        if history.logprobs is not None and logprobs is not None:
            history.logprobs.append(logprobs)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        if self.detokenizer is None:
            if finish_reason is not None or completes:
                self.finish(finish_reason or "stop", now)
            return completes and finish_reason is None
        # An EOS or stop token id ends the text without adding its own.
        delta = self.detokenizer.add_token(token_id) if finish_reason != "stop" else ""
        if finish_reason is not None or completes:
            delta += self.detokenizer.flush()
        checked = len(self._pending_text)
        self._pending_text += delta
        # Below min_tokens a stop string does not end the request; text from then on is searched.
        check_stops = self.params.stop and len(history.token_ids) >= self.params.min_tokens
        stop_at = (
            find_stop_string(self._pending_text, self.params.stop, checked) if check_stops else None
        )
        if stop_at is not None:
            self._pending_text = self._pending_text[:stop_at]
            self.finish("stop", now)
            return True
        if finish_reason is not None:
            self.finish(finish_reason, now)
        elif completes:
            self.finish("stop", now)
            return True
        return False

    def finish(self, reason: str, now: float) -> None:
        """Mark the request finished (first reason wins)."""
        if self.finish_reason is None:
            self.finish_reason, self.finish_time = reason, now

    def make_output(self) -> RequestOutput:
        """A RequestOutput with the deltas since the previous one; O(new tokens)."""
        history = self.history
        pending = self._pending_text
        visible = len(pending) if self.finished else len(pending) - self._hold_back
        delta_text = ""
        if visible > 0:
            delta_text, self._pending_text = pending[:visible], pending[visible:]
            history.add_text(delta_text)
        num_tokens = len(history.token_ids)
        new_token_ids = history.token_ids[self._num_emitted_tokens :]
        new_logprobs = (
            None if history.logprobs is None else history.logprobs[self._num_emitted_tokens :]
        )
        self._num_emitted_tokens = num_tokens
        # The first output (prefill is done by then) and the final one carry the prompt logprobs.
        prompt_logprobs = None
        if self.prompt_logprobs is not None and (not self._prompt_logprobs_sent or self.finished):
            prompt_logprobs, self._prompt_logprobs_sent = list(self.prompt_logprobs), True
        return RequestOutput(
            prompt_logprobs=prompt_logprobs,
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            new_token_ids=new_token_ids,
            delta_text=delta_text,
            new_logprobs=new_logprobs,
            finished=self.finished,
            finish_reason=self.finish_reason,
            index=self.index,
            num_output_tokens=num_tokens,
            num_text_chars=history.num_chars,
            _history=history,
            metrics=RequestMetrics(
                arrival_time=self.arrival_time,
                first_scheduled_time=self.first_scheduled_time,
                first_token_time=self.first_token_time,
                last_token_time=self.last_token_time,
                finish_time=self.finish_time,
                num_preemptions=self.seq.num_preemptions,
                num_cached_tokens=self.seq.num_cached_tokens,
            ),
        )
