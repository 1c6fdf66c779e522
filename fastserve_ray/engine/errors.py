"""Errors a client caused with one request; the HTTP layer turns them into 400 responses."""

from __future__ import annotations

from fastserve_ray.errors import FastServeError


class RequestError(FastServeError, ValueError):
    """A request parameter is invalid; ``param`` names it (OpenAI's error ``param`` field)."""

    # OpenAI's error "type" for a client mistake; the HTTP layer copies it verbatim.
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
