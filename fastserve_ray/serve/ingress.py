"""The OpenAI-compatible HTTP front (FastAPI via ``serve.ingress``): auth, parsing, routing, SSE.

It only converts: bytes -> JSON object -> the model's LLM server (through a DeploymentHandle)
-> JSON or server-sent events. Validation of the request itself happens in the LLM server, so
handle callers get exactly the same answers. Client mistakes are 4xx in OpenAI's error shape;
overload (Serve's backpressure) is 503 with Retry-After; nothing a client sends is a 5xx.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import hmac
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastserve_ray.serve.protocol import error_body, now
from fastserve_ray.serve.router_wait import NoReplicaInTime, wait_for_replica

logger = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The only routes answered without the API key (exact route paths, relative to root_path).
OPEN_ROUTES = frozenset({"/health"})
HEALTH_TIMEOUT_S = 5.0  # a model whose replica does not answer /health within this is unhealthy

try:  # the function Starlette's router itself matches routes with
    from starlette._utils import get_route_path
except ImportError:  # pragma: no cover - older or newer Starlette
    def get_route_path(scope: Any) -> str:
        """The request path relative to ``root_path`` (the Serve route prefix), as routed."""
        path: str = scope["path"]
        root_path = scope.get("root_path", "")
        if not root_path or not path.startswith(root_path):
            return path
        if path == root_path:
            return ""
        return path[len(root_path):] if path[len(root_path)] == "/" else path


def needs_api_key(scope: Any) -> bool:
    """Whether a request must carry the key: every route but OPEN_ROUTES, under any prefix.

    Deny by default, on the path the router will match (``scope["path"]`` minus the route
    prefix Serve's proxy puts in ``root_path``): ``/llm/v1/models`` behind ``route_prefix:
    /llm``, ``//v1/models``, ``/V1/models``, ``/v1/models/``, an unknown route and any route
    added later all need it; only ``/health`` exactly does not.
    """
    return get_route_path(scope) not in OPEN_ROUTES


def _error(status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, type, code), status_code=status, headers=headers)


class _BadRequest(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


async def _read_json(request: Request, max_body_bytes: int) -> Any:
    """The body as JSON, refusing oversize bodies without reading them whole."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise _BadRequest(_error(415, f"Content-Type must be application/json, got {ctype!r}"))
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_body_bytes:
        raise _BadRequest(_error(413, f"request body of {length} bytes exceeds the limit of "
                                      f"{max_body_bytes}"))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise _BadRequest(_error(413, f"request body exceeds the limit of {max_body_bytes} bytes"))
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except RecursionError:
        raise _BadRequest(_error(400, "request body is nested too deeply")) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadRequest(_error(400, f"request body is not valid JSON: {e}")) from None


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def create_app(api_key: str | None, max_body_bytes: int) -> FastAPI:
    """The FastAPI app: OpenAI error shape everywhere, Bearer auth on every route but /health."""
    app = FastAPI(title="fastserve-ray", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def auth_and_request_id(request: Request, call_next: Any) -> Response:
        # Serve's proxy puts an X-Request-Id on every request (the client's, or a fresh one)
        # and echoes it on the response; the completion id is built from it.
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = request_id
        if api_key and needs_api_key(request.scope):
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            # compare_digest: the time taken does not reveal how much of the key matched.
            ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
            if not ok:
                resp: Response = _error(401, "missing or invalid API key (Authorization: Bearer KEY)",
                                        code="invalid_api_key")
                return resp
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        routing = exc.status_code in (404, 405)
        msg = f"no route {request.method} {request.url.path}" if routing else str(exc.detail)
        return _error(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, str(exc.errors()[:1]))

    @app.exception_handler(_BadRequest)
    async def bad_request(request: Request, exc: _BadRequest) -> JSONResponse:
        return exc.response

    return app


class _HandleBackend:
    """An LLM server in another replica, reached through its DeploymentHandle (router mode)."""

    def __init__(self, handle: Any, max_wait_s: float | None = None) -> None:
        self.handle = handle
        self.max_wait_s = max_wait_s  # at the router, for a replica (serve/router_wait.py)

    async def call(self, kind: str, body: Any, request_id: str) -> dict[str, Any]:
        response = self.handle.generate.remote(kind, body, request_id)
        await wait_for_replica(response, self.max_wait_s)
        return await response

    def stream(self, kind: str, body: Any, request_id: str) -> Any:
        return self.handle.options(stream=True).generate_stream.remote(kind, body, request_id)

    async def assigned(self, gen: Any) -> None:
        """Wait (boundedly) until a stream's request reached a replica."""
        await wait_for_replica(gen, self.max_wait_s)

    async def invoke(self, method: str, *args: Any) -> Any:
        """One of the server's other routes (ModelRoutes), in its replica."""
        return await getattr(self.handle, method).remote(*args)


class _LocalBackend:
    """The LLM server of this very replica (direct mode): plain calls, no hop between processes."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def call(self, kind: str, body: Any, request_id: str) -> dict[str, Any]:
        return await self.server.generate(kind, body, request_id)

    def stream(self, kind: str, body: Any, request_id: str) -> Any:
        return self.server.generate_stream(kind, body, request_id)

    async def assigned(self, gen: Any) -> None:
        """Already in the replica: nothing to wait for."""

    async def invoke(self, method: str, *args: Any) -> Any:
        """One of the server's other routes (ModelRoutes)."""
        result = getattr(self.server, method)(*args)
        return await result if hasattr(result, "__await__") else result


def make_ingress_class(api_key: str | None, max_body_bytes: int, retry_after_s: int,
                       server_class: type | None = None) -> type:
    """The HTTP front's deployment class, its FastAPI app closed over the (build-time) settings.

    Router mode (``server_class`` None): a deployment of its own that routes each request by
    ``model`` to that model's LLM server through a DeploymentHandle. Direct mode: the class
    *is* an LLM server (it subclasses ``server_class``) that also speaks HTTP, so a token
    crosses one hop fewer (replica -> proxy -> client); one model only.
    """
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    app = create_app(api_key, max_body_bytes)
    overload_headers = {"Retry-After": str(retry_after_s)}

    def overloaded(e: Exception) -> JSONResponse:
        return _error(503, f"the server is overloaded, retry later ({type(e).__name__})",
                      type="server_error", code="overloaded", headers=overload_headers)

    class OpenAIIngress(server_class or object):  # type: ignore[misc]
        """Routes OpenAI requests to the LLM server of the requested model.

        Route methods are named ``http_*``: in direct mode this class is an LLM server too, and a
        route named like a server method (``health``, ``tokenize``) would replace it.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if server_class is None:
                # served name -> DeploymentHandle of its LLMServerDeployment (and its router wait)
                servers, waits = args if len(args) == 2 else (args[0], {})
                self.servers = {name: _HandleBackend(h, waits.get(name)) for name, h in servers.items()}
            else:
                super().__init__(*args, **kwargs)
                self.servers = {self.served_name: _LocalBackend(self)}
            self.created = now()

        def _backend(self, body: Any) -> Any:
            if not isinstance(body, dict):
                raise _BadRequest(_error(400, "the request body must be a JSON object, got "
                                              f"{type(body).__name__}"))
            model = body.get("model")
            if not isinstance(model, str):
                raise _BadRequest(_error(400, f"model must be a string naming one of {sorted(self.servers)}, "
                                              f"got {model!r}"[:300], param="model"))
            backend = self.servers.get(model)
            if backend is None:
                raise _BadRequest(_error(404, f"model {model[:100]!r} does not exist; served models: "
                                              f"{sorted(self.servers)}", param="model",
                                         code="model_not_found"))
            return backend

        async def _generate(self, kind: str, request: Request) -> Response:
            body = await _read_json(request, max_body_bytes)
            backend = self._backend(body)
            prefix = "chatcmpl" if kind == "chat" else "cmpl"
            request_id = f"{prefix}-{request.state.request_id}"
            stream = body.get("stream", False)
            # A replica that dies before answering (killed, node lost) has sent the client
            # nothing yet: the request is retried once on another replica.
            for attempt in range(2):
                try:
                    if stream is not True:  # the server validates the type: a 400 names `stream`
                        result = await backend.call(kind, body, request_id)
                        if "error" in result:
                            return JSONResponse({"error": result["error"]}, status_code=result["status_code"])
                        return JSONResponse(result)
                    gen = backend.stream(kind, body, request_id)
                    await backend.assigned(gen)
                    first = await gen.__anext__()
                    break
                except (BackPressureError, DeploymentUnavailableError) as e:
                    return overloaded(e)
                except NoReplicaInTime as e:
                    return _error(503, f"model {body['model']!r}: {e} (starting from zero replicas, or all "
                                       "busy); retry later", type="server_error", code="no_replica",
                                  headers=overload_headers)
                except RayActorError as e:
                    logger.warning("replica failed before answering (attempt %d): %r", attempt + 1, e)
                    if attempt == 1:
                        return _error(503, "the replica serving this request failed; retry",
                                      type="server_error", code="replica_failed", headers=overload_headers)
            if "error" in first:
                return JSONResponse({"error": first["error"]}, status_code=first["status_code"])
            return StreamingResponse(self._events(first, gen), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        @staticmethod
        async def _events(first: dict[str, Any], gen: Any) -> AsyncIterator[bytes]:
            # Cancelled when the client disconnects: the cancellation reaches the replica's
            # generator through the handle, and leaving it aborts the engine request.
            yield _sse(first)
            try:
                async for item in gen:
                    if "error" in item:
                        yield _sse({"error": item["error"]})
                        break
                    yield _sse(item)
            except Exception as e:  # the replica died mid-stream: tell the client in-band
                logger.warning("stream failed: %r", e)
                yield _sse(error_body(f"generation failed: {type(e).__name__}", 503, type="server_error"))
            yield b"data: [DONE]\n\n"

        @app.post("/v1/completions")
        async def http_completions(self, request: Request) -> Response:
            """OpenAI completions."""
            return await self._generate("completion", request)

        @app.post("/v1/chat/completions")
        async def http_chat_completions(self, request: Request) -> Response:
            """OpenAI chat completions."""
            return await self._generate("chat", request)

        @app.get("/v1/models")
        async def http_models(self) -> dict[str, Any]:
            """The served models."""
            cards = [await self.servers[name].invoke("model_card", self.created)
                     for name in sorted(self.servers)]
            return {"object": "list", "data": cards}

        @app.get("/v1/models/{model_id:path}")
        async def http_model(self, model_id: str) -> Response:
            """One served model, or 404."""
            backend = self.servers.get(model_id)
            if backend is None:
                return _error(404, f"model {model_id[:100]!r} does not exist; served models: "
                                   f"{sorted(self.servers)}", param="model", code="model_not_found")
            return JSONResponse(await backend.invoke("model_card", self.created))

        async def _route(self, method: str, request: Request) -> Response:
            body = await _read_json(request, max_body_bytes)
            backend = self._backend(body)
            try:
                result = await backend.invoke(method, body)
            except (BackPressureError, DeploymentUnavailableError) as e:
                return overloaded(e)
            except RayActorError:
                return _error(503, "the replica serving this request failed; retry", type="server_error",
                              code="replica_failed", headers=overload_headers)
            if "error" in result:
                return JSONResponse({"error": result["error"]}, status_code=result["status_code"])
            return JSONResponse(result)

        @app.post("/tokenize")
        async def http_tokenize(self, request: Request) -> Response:
            """vLLM's /tokenize: a prompt's or a chat's token ids."""
            return await self._route("tokenize", request)

        @app.post("/detokenize")
        async def http_detokenize(self, request: Request) -> Response:
            """vLLM's /detokenize: token ids back to text."""
            return await self._route("detokenize", request)

        @app.post("/v1/embeddings")
        async def http_embeddings(self, request: Request) -> Response:
            """OpenAI embeddings (last-token pooling, L2-normalised)."""
            return await self._route("embeddings", request)

        @app.get("/version")
        async def http_version(self) -> dict[str, str]:
            """The server's version."""
            from fastserve_ray import __version__

            return {"version": __version__}

        @app.get("/health")
        async def http_health(self) -> Response:
            """200 while every served model's engine runs; 503 naming the first that does not."""
            for name in sorted(self.servers):
                try:
                    result = await asyncio.wait_for(self.servers[name].invoke("health"), HEALTH_TIMEOUT_S)
                except Exception as e:  # noqa: BLE001 - a dead or unreachable replica is unhealthy
                    return _error(503, f"model {name!r} did not answer its health check ({type(e).__name__})",
                                  type="server_error", code="unhealthy")
                if "error" in result:
                    return JSONResponse({"error": result["error"]}, status_code=result["status_code"])
            return JSONResponse({"status": "ok"})

    return serve.ingress(app)(OpenAIIngress)
