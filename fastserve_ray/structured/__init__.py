"""Structured outputs: grammars (JSON schema, regex, choice, Lark / GBNF) as per-token masks.

``GrammarSpec`` says what the output must match; ``GrammarCompiler`` turns it, once per spec,
into a grammar for the tokenizer a model uses, and hands each sequence its own
``GrammarMatcher``; ``GrammarCompiler.fill`` computes the batch's masks for the sampler. The grammar
engine is llguidance (see docs/serving.md, "Structured outputs", for why).
"""

from fastserve_ray.structured.grammar import GrammarCompiler, GrammarMatcher
from fastserve_ray.structured.spec import GrammarError, GrammarSpec

__all__ = ["GrammarCompiler", "GrammarError", "GrammarMatcher", "GrammarSpec"]
