"""OpenAI request/response shapes and the error shape; shared by HTTP and handle callers.

Requests are pydantic models in strict mode (``"5"`` is not an integer, ``true`` is not 1);
fields OpenAI defines that we do not use are accepted and ignored, as OpenAI clients send
them. Every problem becomes an APIError carrying the HTTP status and the offending ``param``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is meaningful."""

    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Request):
    """``POST /v1/completions``: a string, a list of strings, token ids or a list of those."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    """One chat message; content is a string or a list of text parts."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()


def parse_request(cls: type[_Request], body: Any) -> _Request:
    """Validate a decoded JSON body; APIError(400) names the first bad field."""
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None  # the top-level field at fault
        where = ".".join(str(p) for p in err["loc"])
        raw = repr(err.get("input"))
        raw = raw if len(raw) <= 80 else raw[:77] + "..."
        raise APIError(f"{where}: {err['msg']} (got {raw})", 400, param) from None


def new_request_id(kind: str) -> str:
    """``cmpl-…`` / ``chatcmpl-…`` ids, as OpenAI spells them."""
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds for ``created``."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI ``usage``."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
