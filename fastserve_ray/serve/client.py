"""Calling a deployed model from other Ray jobs, tasks and actors through a DeploymentHandle.

The request and response objects are the HTTP ones (OpenAI dicts); errors raise APIError with
the same status, message and ``param`` the HTTP API would answer. Example::

    handle = get_model_handle("tiny")
    out = complete_sync(handle, {"model": "tiny", "prompt": "Hello", "max_tokens": 8})
    async for chunk in stream(handle, {"model": "tiny", "prompt": "Hello", "max_tokens": 8}):
        print(chunk["choices"][0]["text"], end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import BaseModel

from fastserve_ray.serve.builder import server_deployment_name
from fastserve_ray.serve.protocol import APIError

DEFAULT_APP_NAME = "fastserve"


def get_model_handle(model: str, app_name: str = DEFAULT_APP_NAME) -> Any:
    """A DeploymentHandle to the LLM server of served model ``model`` in application ``app_name``."""
    from ray import serve

    return serve.get_deployment_handle(server_deployment_name(model), app_name)


def _body(request: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    if isinstance(request, BaseModel):
        return request.model_dump(exclude_none=True)
    return dict(request)


def _kind(body: Mapping[str, Any]) -> str:
    return "chat" if "messages" in body else "completion"


def _check(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        raise APIError.from_dict(result)
    return result


async def complete(handle: Any, request: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """One whole completion (``prompt``) or chat completion (``messages``); APIError on failure."""
    body = _body(request)
    return _check(await handle.generate.remote(_kind(body), body))


def complete_sync(handle: Any, request: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """``complete`` for synchronous code (a Ray task, a script); blocks until done."""
    body = _body(request)
    return _check(handle.generate.remote(_kind(body), body).result())


async def stream(handle: Any, request: Mapping[str, Any] | BaseModel) -> AsyncIterator[dict[str, Any]]:
    """OpenAI chunks as they are generated; leaving the loop early aborts the request."""
    body = _body(request)
    gen = handle.options(stream=True).generate_stream.remote(_kind(body), body)
    async for chunk in gen:
        yield _check(chunk)


def stream_sync(handle: Any, request: Mapping[str, Any] | BaseModel) -> Any:
    """``stream`` for synchronous code: an iterator of chunks."""
    body = _body(request)
    for chunk in handle.options(stream=True).generate_stream.remote(_kind(body), body):
        yield _check(chunk)


def engine_load(handle: Any) -> dict[str, float]:
    """One replica's engine load snapshot (waiting/running sequences, KV-cache use, counters)."""
    return handle.load.remote().result()
