"""The structured-output fields of a request -> one GrammarSpec (or None), errors naming the field.

Three spellings reach the same constraint: OpenAI's ``response_format`` (``json_object``,
``json_schema``), vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``,
``json_object``) and vLLM's older ``guided_*`` fields. A request may use one of them; two
constraints at once are a 400, as is any key this server does not implement.
"""

from __future__ import annotations

import json
from typing import Any

from fastserve_ray.serve.protocol import APIError
from fastserve_ray.structured import GrammarError, GrammarSpec

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
FIELDS = ("response_format", "structured_outputs", *GUIDED_FIELDS)
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's options that only tune how a backend works: accepted at the value this server runs.
_STRUCTURED_NEUTRAL = {"disable_any_whitespace": (None, True), "disable_fallback": (None, True, False),
                       "disable_additional_properties": (None, False), "whitespace_pattern": (None,),
                       "backend": (None, "auto", "guidance"), "structural_tag": (None,)}


def requested_field(req: Any) -> str | None:
    """The request field that carries its structured-output constraint, if any."""
    return next((n for n in FIELDS if _is_set(n, getattr(req, n, None))), None)


def grammar_spec(req: Any) -> GrammarSpec | None:
    """The request's constraint as a GrammarSpec; APIError(400) naming the field when it is bad."""
    fields = [n for n in FIELDS if _is_set(n, getattr(req, n, None))]
    if not fields:
        return None
    if len(fields) > 1:
        raise APIError(f"{fields[0]} and {fields[1]} both constrain the output; send one",
                       param=fields[1])
    field = fields[0]
    value = getattr(req, field)
    try:
        if field == "response_format":
            return _response_format(value)
        if field == "structured_outputs":
            return _structured_outputs(value)
        return _spec(GUIDED_FIELDS[field], value, field)
    except GrammarError as e:
        raise APIError(f"{field}: {e}", param=field) from None


def _is_set(name: str, value: Any) -> bool:
    if name == "response_format":
        return value is not None and value != {"type": "text"}
    return value is not None and value != {}


def _response_format(value: Any) -> GrammarSpec | None:
    if not isinstance(value, dict):
        raise APIError(f"response_format must be an object, got {type(value).__name__}",
                       param="response_format")
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise APIError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got "
                       f"{str(kind)[:40]!r}", param="response_format")
    extra = sorted(set(value) - allowed[kind])
    if extra:
        raise APIError(f"response_format.{extra[0][:40]}: unknown field for type {kind!r}",
                       param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise APIError("response_format.json_schema must be an object with name and schema",
                       param="response_format")
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise APIError(f"response_format.json_schema.{extra[0][:40]}: unknown field", param="response_format")
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise APIError("response_format.json_schema.name must be a string of 1 to 64 characters",
                       param="response_format")
    if spec.get("strict") not in (None, True, False):
        raise APIError("response_format.json_schema.strict must be true, false or null",
                       param="response_format")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise APIError("response_format.json_schema.description must be a string", param="response_format")
    schema = spec.get("schema")
    if schema is None:  # OpenAI makes it optional: any JSON object then
        return GrammarSpec("json_object")
    return GrammarSpec.json_schema(schema)


def _structured_outputs(value: Any) -> GrammarSpec:
    if not isinstance(value, dict):
        raise APIError(f"structured_outputs must be an object, got {type(value).__name__}",
                       param="structured_outputs")
    for key, accepted in _STRUCTURED_NEUTRAL.items():
        if key in value and value[key] not in accepted:
            raise APIError(f"structured_outputs.{key}: only {', '.join(map(json.dumps, accepted))} is "
                           f"supported (this server always generates compact JSON with llguidance), got "
                           f"{json.dumps(value[key])[:60]}", param="structured_outputs")
    unknown = sorted(set(value) - set(_STRUCTURED_KEYS) - set(_STRUCTURED_NEUTRAL))
    if unknown:
        raise APIError(f"structured_outputs.{unknown[0][:40]}: unknown field; supported: "
                       f"{', '.join(_STRUCTURED_KEYS)}", param="structured_outputs")
    given = [k for k in _STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise APIError(f"structured_outputs needs exactly one of {', '.join(_STRUCTURED_KEYS)}, got "
                       f"{', '.join(given) or 'none'}", param="structured_outputs")
    return _spec(given[0], value[given[0]], "structured_outputs")


def _spec(kind: str, value: Any, field: str) -> GrammarSpec:
    if kind == "json_object":
        if value is not True:
            raise APIError(f"{field}.json_object must be true", param=field)
        return GrammarSpec("json_object")
    if kind == "json":
        if isinstance(value, str):  # vLLM accepts the schema as JSON text too
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise APIError(f"{field}.json: not a JSON schema ({e})", param=field) from None
        return GrammarSpec.json_schema(value)
    if kind == "choice":
        return GrammarSpec.choice(value)
    if not isinstance(value, str) or not value:
        raise APIError(f"{field}.{kind} must be a non-empty string", param=field)
    return GrammarSpec(kind, value)
