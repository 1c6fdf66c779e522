"""OpenAI request/response shapes and the error shape; shared by HTTP and handle callers.

Requests are pydantic models in strict mode (``"5"`` is not an integer, ``true`` is not 1) that
forbid unknown fields. ``null`` means the default wherever OpenAI allows it. Every field either
works, is harmless metadata (accepted, no effect: ``user``, ``metadata``, ...), or, where it asks
for something this server does not do (``suffix``, ``audio``, ...), is a 400 naming it; nothing
is silently dropped. Every problem becomes an APIError carrying the HTTP
status and the offending ``param``. The full table is in docs/serving.md.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16


class APIError(Exception):
    """A request that cannot be served; becomes ``{"error": {...}}`` with ``status_code``."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.type = type
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body, plus the status code for the HTTP layer."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}, "status_code": self.status_code}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIError:
        """Rebuild from ``to_dict()`` (a handle caller gets the same exception as in-process)."""
        e = d["error"]
        return cls(e["message"], d.get("status_code", 400), e.get("param"), e.get("type") or
                   "invalid_request_error", e.get("code"))


def error_body(message: str, status_code: int, param: str | None = None,
               type: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """An OpenAI error body (without the status code)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _none_or_empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _none_or_false(v: Any) -> bool:
    return v is None or v is False


class _Model(BaseModel):
    # extra="forbid": a field this server does not know is a 400 naming it, never dropped.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Model):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    include_usage: bool | None = None


# Fields clients send that this server knows but does not implement: the value that means
# "not asked for" is accepted, anything else is a 400 naming the field. (name -> (is_neutral,
# what is missing)); the fields are declared on the request models as ``Any``.
_NOT_IMPLEMENTED_COMMON: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompt_logprobs": (lambda v: v is None, "prompt logprobs are not supported yet"),
    "use_beam_search": (_none_or_false, "beam search is not supported"),
}
_NOT_IMPLEMENTED_COMPLETION: dict[str, tuple[Callable[[Any], bool], str]] = {
    **_NOT_IMPLEMENTED_COMMON,
    "suffix": (lambda v: v is None or v == "", "suffix (insertion) is not supported"),
}
_NOT_IMPLEMENTED_CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    **_NOT_IMPLEMENTED_COMMON,
    "functions": (_none_or_empty, "the deprecated functions field is not supported: send tools"),
    "function_call": (lambda v: v is None or v == "none",
                      "the deprecated function_call field is not supported: send tool_choice"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: v is None, "this server has no reasoning models"),
    "verbosity": (lambda v: v is None, "verbosity is not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    "store": (_none_or_false, "store: this server keeps no completions"),
    "service_tier": (lambda v: v in (None, "auto", "default"),
                     "service_tier: this server has one tier ('auto' / 'default')"),
    # A template is code (sandboxed Jinja): only the model directory's runs, as vLLM does
    # unless started with --trust-request-chat-template.
    "chat_template": (lambda v: v is None, "a chat template in the request is not accepted; the "
                      "model directory's template is used"),
    "continue_final_message": (_none_or_false, "continue_final_message is not supported yet"),
    "echo": (_none_or_false, "echo is not supported on chat completions"),
}


class _Request(_Model):
    # OpenAI's fields common to both endpoints; null means the default wherever OpenAI allows it.
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None  # token id (a string in JSON) -> bias in [-100, 100]
    user: str | None = None  # accepted; no effect
    # vLLM's sampling extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # structured outputs (serve/structured_request.py reads and checks them)
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    # known, not implemented (see _NOT_IMPLEMENTED_*)
    prompt_logprobs: Any = None
    use_beam_search: Any = None

    _not_implemented: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = _NOT_IMPLEMENTED_COMMON

    def check_implemented(self) -> None:
        """APIError(400) naming the first field asked for that this server does not implement."""
        for name, (neutral, why) in self._not_implemented.items():
            value = getattr(self, name)
            if not neutral(value):
                raw = repr(value)
                raw = raw if len(raw) <= 80 else raw[:77] + "..."
                raise APIError(f"{name}: {why} (got {raw})", param=name)
        if self.stream_options is not None and self.stream is not True:
            raise APIError("stream_options is only allowed when stream is true", param="stream_options")


class CompletionRequest(_Request):
    """``POST /v1/completions``: a string, a list of strings, token ids or a list of those."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None  # null or n (nothing to choose from otherwise)
    suffix: Any = None

    _not_implemented: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = _NOT_IMPLEMENTED_COMPLETION


class ChatMessage(_Model):
    """One chat message: string content or a list of text parts (other fields: see checks)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    refusal: Any = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None  # output-only (url citations); a returned message may carry it back


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # OpenAI metadata: accepted, no effect on the output
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None  # the prefix cache is automatic
    safety_identifier: str | None = None
    # tool calling (serve/tool_calls.py reads and checks them)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # default true
    # vLLM's chat extras: passed to the chat template
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None  # default true
    documents: list[dict[str, Any]] | None = None
    # known, not implemented (see _NOT_IMPLEMENTED_CHAT)
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    store: Any = None
    service_tier: Any = None
    chat_template: Any = None
    continue_final_message: Any = None
    echo: Any = None

    _not_implemented: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = _NOT_IMPLEMENTED_CHAT
    # Set by the server once checked: the tools as the template reads them, and tool_choice.
    _tools: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _tool_choice: Any = PrivateAttr(default=None)

    def check_implemented(self) -> None:
        """As for completions, plus each message's fields."""
        super().check_implemented()
        check_messages(self.messages)


def check_messages(messages: list[ChatMessage]) -> None:
    """APIError(400, param messages) for a message field this server does not take."""
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if m.role == "function":
            raise APIError(f"{where}.role: 'function' messages (deprecated) are not supported; send "
                           "role 'tool' with tool_call_id", param="messages")
        if m.function_call is not None:
            raise APIError(f"{where}.function_call (deprecated) is not supported; send tool_calls",
                           param="messages")
        if not _none_or_empty(m.tool_calls) and m.role != "assistant":
            raise APIError(f"{where}.tool_calls: only an assistant message may carry tool calls",
                           param="messages")
        if m.role == "tool" and not isinstance(m.tool_call_id, str):
            raise APIError(f"{where}.tool_call_id: a tool message needs the id of the call it answers",
                           param="messages")
        if m.tool_call_id is not None and m.role != "tool":
            raise APIError(f"{where}.tool_call_id: only a tool message answers a call", param="messages")
        if m.audio is not None:
            raise APIError(f"{where}.audio: audio is not supported", param="messages")
        if m.refusal is not None and not (isinstance(m.refusal, str) and m.role == "assistant"):
            raise APIError(f"{where}.refusal: only an assistant message may carry a refusal string",
                           param="messages")
        if m.content is None and m.refusal is None and m.role not in ("assistant",):
            raise APIError(f"{where}.content: a {m.role} message needs content", param="messages")
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                kind = part.get("type")
                text_part = kind == "text" and isinstance(part.get("text"), str)
                if not text_part or set(part) != {"type", "text"}:
                    shown = kind if isinstance(kind, str) else type(kind).__name__
                    raise APIError(f"{where}.content.{j}: only text parts "
                                   f'({{"type": "text", "text": ...}}) are supported, got type '
                                   f"{shown[:40]!r}", param="messages")


class TokenizeRequest(_Model):
    """``POST /tokenize`` (vLLM's shape): a ``prompt``, or chat ``messages`` through the template."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # prompt: BOS (default true); chat: ignored (the template)
    add_generation_prompt: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Any = None
    documents: list[dict[str, Any]] | None = None
    return_token_strs: bool | None = None
    _tools: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _tool_choice: Any = PrivateAttr(default=None)


class DetokenizeRequest(_Model):
    """``POST /detokenize`` (vLLM's shape)."""

    model: str
    tokens: list[int]


class EmbeddingRequest(_Model):
    """``POST /v1/embeddings``: a string, a list of strings, token ids or a list of those."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None  # accepted; no effect


CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()


def parse_request(cls: type[_Model], body: Any) -> Any:
    """Validate a decoded JSON body; APIError(400) names the first bad field."""
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None  # the top-level field at fault
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise APIError(f"{where[:100]}: unknown field; this server does not implement it (the "
                           "supported and refused fields are listed in docs/serving.md)",
                           400, param[:100] if param else None) from None
        raw = repr(err.get("input"))
        raw = raw if len(raw) <= 80 else raw[:77] + "..."
        raise APIError(f"{where}: {err['msg']} (got {raw})", 400, param) from None
    if isinstance(req, _Request):
        req.check_implemented()
    return req


def new_request_id(kind: str) -> str:
    """``cmpl-…`` / ``chatcmpl-…`` ids, as OpenAI spells them."""
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds for ``created``."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI ``usage``, with ``prompt_tokens_details.cached_tokens`` (prefix-cache hits)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
