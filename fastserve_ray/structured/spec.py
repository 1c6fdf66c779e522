"""What a structured output must match: a JSON schema, any JSON object, a regex, a choice, a grammar.

A ``GrammarSpec`` is plain data (frozen, hashable, cheap to send to an engine process): the
kind and its source text. ``to_grammar()`` gives the llguidance grammar text; validation
against a tokenizer happens in ``GrammarCompiler``.

JSON is generated compactly and deterministically: no free whitespace, ``", "`` between items
and ``": "`` after keys (what ``json.dumps`` writes). Free whitespace would let a model emit
spaces forever and never close the object; fixed separators keep every token on the way to a
valid document.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastserve_ray.errors import FastServeError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "lark")
MAX_SOURCE_CHARS = 200_000  # a schema / grammar larger than this is refused before compiling
MAX_CHOICES = 1024
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(FastServeError):
    """A spec that cannot be compiled (bad schema, unsupported feature, bad regex or grammar)."""


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """One structured-output constraint: ``kind`` (see KINDS) and its source text.

    ``json_schema``: a JSON schema (as JSON text); ``json_object``: any JSON object (source
    unused); ``regex``: a regular expression the whole output matches; ``choice``: a JSON list
    of strings, the output is exactly one of them; ``grammar``: a Lark or GBNF (llama.cpp /
    vLLM EBNF) grammar; ``lark``: a Lark grammar built by this project (tool calls).
    """

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown structured output kind {self.kind!r}; one of {', '.join(KINDS)}")
        if not isinstance(self.source, str):
            raise GrammarError(f"{self.kind}: the source must be text, got {type(self.source).__name__}")
        if len(self.source) > MAX_SOURCE_CHARS:
            raise GrammarError(f"{self.kind} is {len(self.source)} characters; at most "
                               f"{MAX_SOURCE_CHARS} are accepted")

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:
        """A JSON schema given as a mapping (or ``true``: any JSON value)."""
        if not isinstance(schema, (Mapping, bool)):
            raise GrammarError(f"json_schema: a schema must be a JSON object, got {type(schema).__name__}")
        try:
            text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"json_schema: the schema is not JSON ({e})") from None
        return cls("json_schema", text)

    @classmethod
    def choice(cls, options: Sequence[str]) -> GrammarSpec:
        """Exactly one of ``options`` (non-empty strings)."""
        if isinstance(options, str) or not isinstance(options, Sequence) or not options:
            raise GrammarError("choice must be a non-empty list of strings")
        if len(options) > MAX_CHOICES:
            raise GrammarError(f"choice has {len(options)} options; at most {MAX_CHOICES}")
        for o in options:
            if not isinstance(o, str) or not o:
                raise GrammarError(f"choice options must be non-empty strings, got {o!r}"[:200])
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    def to_grammar(self) -> str:
        """The llguidance grammar text (not yet validated: see GrammarCompiler)."""
        import llguidance

        if self.kind == "json_object":
            schema: Any = {"type": "object"}
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
            except ValueError as e:
                raise GrammarError(f"json_schema: {e}") from None
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            options = json.loads(self.source)
            alternatives = " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
        if self.kind == "grammar":
            from llguidance.gbnf_to_lark import any_to_lark

            try:
                lark = any_to_lark(self.source)  # GBNF (root ::= ...) or Lark as given
            except Exception as e:  # noqa: BLE001 - the converter raises assorted errors
                raise GrammarError(f"grammar: could not read it as Lark or GBNF ({e})"[:1000]) from None
            return llguidance.LLMatcher.grammar_from_lark(lark)
        return llguidance.LLMatcher.grammar_from_lark(self.source)  # lark
