"""The engine's structured-output grammars: compiled on the first structured request, then cached.

Both engine fronts use it: the in-process engine to give each sample its matcher, the
process front to validate a request's grammar before it crosses to the engine process (so a
bad schema is a RequestError from ``generate``, as every other bad parameter is).
"""

from __future__ import annotations

import threading

import torch

from fastserve_ray.engine.errors import RequestError
from fastserve_ray.engine.sampling_params import SamplingParams
from fastserve_ray.structured import GrammarCompiler, GrammarError, GrammarMatcher
from fastserve_ray.tokenizer import Tokenizer


class EngineGrammars:
    """A GrammarCompiler for the engine's tokenizer, built lazily; errors become RequestErrors."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def _get(self) -> GrammarCompiler:
        if self.tokenizer is None:
            raise RequestError("structured outputs need the model's tokenizer; this engine has none",
                               "structured_outputs")
        with self._lock:
            if self._compiler is None:
                try:
                    self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size)
                except GrammarError as e:
                    raise RequestError(str(e), "structured_outputs") from None
            return self._compiler

    def check(self, params: SamplingParams) -> None:
        """RequestError (param ``structured_outputs``) if the request's grammar does not compile."""
        if params.structured is not None:
            try:
                self._get().compile(params.structured)
            except GrammarError as e:
                raise RequestError(str(e), "structured_outputs") from None

    def matchers(self, params: SamplingParams) -> list[GrammarMatcher | None]:
        """One matcher per sample of a structured request; None for each sample otherwise."""
        if params.structured is None:
            return [None] * params.n
        compiler = self._get()
        try:
            return [compiler.matcher(params.structured) for _ in range(params.n)]
        except GrammarError as e:
            raise RequestError(str(e), "structured_outputs") from None

    def allowed(self, matchers: list[GrammarMatcher | None]) -> tuple[list[int], torch.Tensor] | None:
        """The rows that follow a grammar and each one's next-token bias (None: no such row)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        assert self._compiler is not None  # a matcher exists, so the compiler does
        return rows, self._compiler.fill([matchers[i] for i in rows])  # type: ignore[misc]
