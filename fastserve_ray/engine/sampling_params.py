"""Per-request sampling parameters and request validation; every error names param and value.

Validation happens where the values enter (construction, then ``validate(vocab_size)`` once the
model is known), so the engine never sees an impossible request and the HTTP layer can answer
400 with OpenAI's ``param`` field instead of failing mid-generation.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastserve_ray.engine.errors import RequestError
from fastserve_ray.structured.spec import GrammarSpec

MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2]
MAX_LOGPROBS = 20  # same cap as OpenAI's top_logprobs; keeps the sampler's top-k cheap
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts up to a uint64
MAX_PENALTY = 2.0  # OpenAI's presence/frequency penalties live in [-2, 2]
MAX_N = 128  # samples per prompt; each is a sequence of its own in the batch
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value is [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 1024  # tokens one request may bias (each costs the sampler a write per step)


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `max_tokens=True` is a client mistake, not 1. numbers.Integral
    # also admits numpy integers; the exact-type test keeps long prompts fast.
    return type(value) is int or (
        isinstance(value, numbers.Integral) and not isinstance(value, bool)
    )


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's tokens; invalid values raise RequestError at construction.

    Penalties act on the logits before temperature, top-k and top-p (greedy rows too):
    ``repetition_penalty`` (CTRL / Hugging Face: a positive logit of any token already in the
    prompt or the output is divided by it, a negative one multiplied; 1 is off),
    ``frequency_penalty`` (subtracted once per occurrence of the token in the output) and
    ``presence_penalty`` (subtracted once if the token occurs in the output), as OpenAI
    defines them. ``min_tokens``: EOS and ``stop_token_ids`` cannot be sampled, and stop
    strings do not end the request, before that many output tokens.

    ``logit_bias`` (OpenAI's: token id -> a bias in [-100, 100]) is added to the logits after
    the penalties, greedy rows included; -100 all but bans a token, +100 all but forces it.
    Given as a mapping (``{id: bias}``, ids as ints or decimal strings) or pairs; stored as
    sorted ``(id, bias)`` pairs. ``min_p`` (vLLM's, [0, 1]; 0 is off) drops the tokens whose
    probability, after temperature, is below ``min_p`` times the most likely token's; sampled
    rows only, like ``top_k`` and ``top_p``, which apply after it.

    ``structured`` (a GrammarSpec: JSON schema, regex, choice, grammar) restricts every sampled
    token to those the grammar allows next, greedy rows included; the request ends ("stop") as
    soon as the grammar is complete. It cannot be combined with ``min_tokens`` (the grammar
    decides where the output ends).

    ``n`` > 1 asks for n independent samples of one prompt. The engine runs them as n child
    requests with ids ``f"{request_id}-{i}"`` (i = 0 .. n-1; see ``sample_request_ids``), each
    streaming its own RequestOutputs with ``RequestOutput.index == i``; the first computes the
    prompt and the others start once its KV is cached, so they share the prompt's full KV
    blocks through the prefix cache. ``abort(request_id)`` aborts all n; a child id aborts
    one. With a ``seed``, sample i draws from ``seed + i`` (mod 2**64). ``n == 1`` keeps the
    request id as given and ``index == 0``.
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables; -1 (vLLM's spelling of "disabled") is normalised to 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # a str or any iterable of str is accepted
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's logprob plus the top k
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob plus the top k
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # (0, 2]; 1 is off
    min_tokens: int = 0  # at most max_tokens
    n: int = 1  # samples of this prompt, [1, MAX_N]
    min_p: float = 0.0  # [0, 1]; 0 is off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]), sorted by id
    # The output must match this grammar (structured outputs); None: free text.
    structured: GrammarSpec | None = None

    def __post_init__(self) -> None:
        # Normalise the loose shapes clients send (a bare string, lists) so the rest of the
        # engine sees one form; frozen, hence object.__setattr__.
        if self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, Iterable):
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is None:
            object.__setattr__(self, "stop_token_ids", ())
        elif isinstance(self.stop_token_ids, Iterable):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Whether any of the three penalties changes the logits."""
        return (
            self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise RequestError naming the parameter and value; token ids checked if vocab known."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens"
            )
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise RequestError(
                f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}], got {t!r}",
                "temperature",
            )
        p = self.top_p
        if not _is_real(p) or not math.isfinite(p) or not 0 < p <= 1:
            raise RequestError(f"top_p must be a number in (0, 1], got {p!r}", "top_p")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise RequestError(
                f"top_k must be an integer >= 1, or 0 / -1 to disable it, got {self.top_k!r}",
                "top_k",
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise RequestError(
                f"seed must be an integer in [0, 2**64 - 1] or null, got {self.seed!r}", "seed"
            )
        if not isinstance(self.stop, tuple):
            raise RequestError(
                f"stop must be a string or a list of strings, got {self.stop!r}", "stop"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError(f"stop strings must be non-empty strings, got {s!r}", "stop")
        if not isinstance(self.stop_token_ids, tuple):
            raise RequestError(
                f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}",
                "stop_token_ids",
            )
        for tok in self.stop_token_ids:
            if not _is_int(tok) or tok < 0 or (vocab_size is not None and tok >= vocab_size):
                bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
                raise RequestError(
                    f"stop_token_ids: token id {tok!r} is outside the vocabulary {bound}",
                    "stop_token_ids",
                )
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}",
                               "ignore_eos")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise RequestError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or null, "
                f"got {self.logprobs!r}",
                "logprobs",
            )
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise RequestError(
                f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}] or null, "
                f"got {self.prompt_logprobs!r}",
                "prompt_logprobs",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise RequestError(
                    f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v!r}", name
                )
        r = self.repetition_penalty
        if not _is_real(r) or not math.isfinite(r) or not 0 < r <= MAX_PENALTY:
            raise RequestError(
                f"repetition_penalty must be a number in (0, {MAX_PENALTY:g}], got {r!r}",
                "repetition_penalty",
            )
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens!r}",
                "min_tokens",
            )
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise RequestError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}", "n")
        m = self.min_p
        if not _is_real(m) or not math.isfinite(m) or not 0 <= m <= 1:
            raise RequestError(f"min_p must be a number in [0, 1], got {m!r}", "min_p")
        if self.structured is not None:
            if not isinstance(self.structured, GrammarSpec):
                raise RequestError(f"structured must be a GrammarSpec, got {type(self.structured).__name__}",
                                   "structured_outputs")
            if self.min_tokens:
                raise RequestError("min_tokens cannot be combined with structured outputs: the grammar "
                                   "decides where the output ends", "min_tokens")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise RequestError(
                f"logit_bias may bias at most {MAX_LOGIT_BIAS_ENTRIES} tokens, "
                f"got {len(self.logit_bias)}",
                "logit_bias",
            )
        for tok, bias in self.logit_bias:
            if vocab_size is not None and tok >= vocab_size:
                raise RequestError(
                    f"logit_bias: token id {tok} is outside the vocabulary [0, {vocab_size})",
                    "logit_bias",
                )
            if not math.isfinite(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise RequestError(
                    f"logit_bias: the bias of token {tok} must be a number in "
                    f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}",
                    "logit_bias",
                )


def _normalise_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """``{id: bias}`` or ``[(id, bias), ...]`` -> sorted ``(int id, float bias)`` pairs.

    Ids may be ints or decimal strings (JSON object keys are strings: OpenAI sends ``"50256"``);
    a bad shape, id or value raises RequestError naming ``logit_bias``. Ranges are checked by
    ``validate``.
    """
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        items = list(value)
        if not all(isinstance(it, tuple) and len(it) == 2 for it in items):
            raise RequestError(
                "logit_bias must map token ids to biases, got a list that is not (id, bias) pairs",
                "logit_bias",
            )
    else:
        raise RequestError(
            f"logit_bias must map token ids to biases, got {type(value).__name__}", "logit_bias"
        )
    if len(items) > MAX_LOGIT_BIAS_ENTRIES:  # before parsing them all
        raise RequestError(
            f"logit_bias may bias at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(items)}",
            "logit_bias",
        )
    pairs: dict[int, float] = {}
    for key, bias in items:
        digits = isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12
        if digits or (_is_int(key) and key >= 0):
            tok = int(key)
        else:
            raise RequestError(
                f"logit_bias keys must be token ids (non-negative integers, as strings in JSON), "
                f"got {str(key)[:40]!r}",
                "logit_bias",
            )
        try:
            as_float = float(bias) if _is_real(bias) else None
        except OverflowError:  # an int too large for a float
            as_float = math.inf
        if as_float is None:
            raise RequestError(
                f"logit_bias: the bias of token {tok} must be a number, got {bias!r}"[:200],
                "logit_bias",
            )
        if tok in pairs:
            raise RequestError(f"logit_bias: token id {tok} appears twice", "logit_bias")
        pairs[tok] = as_float
    return tuple(sorted(pairs.items()))


def sample_request_ids(request_id: str, n: int) -> list[str]:
    """The request ids of a request's ``n`` samples: itself when n == 1, else ``<id>-<i>``."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


def validate_prompt(
    prompt_token_ids: Sequence[int], *, max_tokens: int, vocab_size: int, max_model_len: int
) -> list[int]:
    """Check a tokenized prompt against the vocabulary and context length; return it as a list."""
    if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Sequence):
        raise RequestError(
            f"prompt must be a list of token ids, got {type(prompt_token_ids).__name__}", "prompt"
        )
    if len(prompt_token_ids) == 0:
        raise RequestError("prompt must contain at least one token, got an empty prompt", "prompt")
    for i, tok in enumerate(prompt_token_ids):
        if not _is_int(tok) or not 0 <= tok < vocab_size:
            raise RequestError(
                f"prompt token id {tok!r} at position {i} is outside the vocabulary "
                f"[0, {vocab_size})",
                "prompt",
            )
    num_prompt_tokens = len(prompt_token_ids)
    if num_prompt_tokens + max_tokens > max_model_len:
        # Blame the prompt when it alone leaves no room; otherwise max_tokens asked too much.
        param = "prompt" if num_prompt_tokens >= max_model_len else "max_tokens"
        raise RequestError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{num_prompt_tokens + max_tokens} exceeds the model's maximum context length "
            f"max_model_len={max_model_len}",
            param,
        )
    return list(prompt_token_ids)


def validate_request(
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    *,
    vocab_size: int,
    max_model_len: int,
) -> list[int]:
    """Validate params against the vocabulary and the prompt against the model; return the ids."""
    params.validate(vocab_size)
    return validate_prompt(
        prompt_token_ids,
        max_tokens=params.max_tokens,
        vocab_size=vocab_size,
        max_model_len=max_model_len,
    )
