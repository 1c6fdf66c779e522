"""The LLM server: one engine per replica, OpenAI requests in, OpenAI responses (or chunks) out.

``LLMServer`` is a plain class (usable in-process and in unit tests); ``LLMServerDeployment``
adds what Ray Serve asks of a replica: health checks, autoscaling stats and metrics. Errors
never raise across the handle: they come back as ``APIError.to_dict()`` (the first and only
item of a stream), so HTTP and handle callers see the same status, message and ``param``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastserve_ray.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_chat
from fastserve_ray.engine import AsyncLLMEngine, EngineDeadError, RequestError, RequestOutput, SamplingParams
from fastserve_ray.engine.detokenizer import StopStringText
from fastserve_ray.engine.outputs import OutputHistory
from fastserve_ray.serve.logprobs import LogprobFormatter, TextOffsets
from fastserve_ray.serve.model_routes import ModelRoutes
from fastserve_ray.serve.protocol import (
    MAX_PROMPTS,
    MAX_STOP,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    new_request_id,
    now,
    parse_request,
    usage,
)
from fastserve_ray.serve.structured_request import grammar_spec, requested_field
from fastserve_ray.serve.tool_calls import (
    ToolCallParser,
    call_grammar,
    history_tool_calls,
    parse_output,
    tool_choice,
    validate_tools,
)

# Request fields passed to SamplingParams as they are when not null (null: SamplingParams'
# default, which is OpenAI's / vLLM's neutral value).
_PASSTHROUGH_FIELDS = ("temperature", "top_p", "top_k", "seed", "n", "presence_penalty",
                       "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "min_p",
                       "stop_token_ids", "logit_bias")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHARS_PER_TOKEN_LIMIT = 32  # a text prompt longer than this x context is refused untokenized


def chat_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI messages as the plain dicts a chat template reads.

    Text parts are joined into one string (templates written for string content, as most
    are, then work); an assistant message without content gets its refusal or "". Assistant
    ``tool_calls`` carry their arguments as objects (what templates write out), tool results
    their ``tool_call_id``.
    """
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):  # OpenAI content parts (validated: text parts only)
            content = "".join(part["text"] for part in content)
        if content is None:
            content = m.refusal if isinstance(m.refusal, str) else ""
        message: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = history_tool_calls(m.tool_calls, f"messages.{i}")
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _kv_capacity_tokens(engine: Any) -> int | None:
    """The longest sequence the engine's KV cache can hold, where the engine says."""
    cap = getattr(engine, "_kv_capacity_tokens", None)  # ProcessLLMEngine (reported at start)
    if cap is None:  # AsyncLLMEngine over an in-process LLMEngine
        block_manager = getattr(getattr(engine, "engine", None), "block_manager", None)
        cap = getattr(block_manager, "max_seq_len", None)
    return cap if isinstance(cap, int) else None


class PromptBuilder:
    """A request's prompts as token ids: parsing, the chat template and tokenization.

    One implementation for the two places that need the ids: LLMServer, before it runs a
    request, and the prefix-aware router (serve/prefix_router.py), which hashes the same ids in
    the caller's process to pick the replica that has them cached. Needs only a tokenizer.
    """

    def __init__(self, tokenizer: Any, max_model_len: int, served_name: str) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.served_name = served_name

    def _parse(self, kind: str, body: Any) -> CompletionRequest | ChatCompletionRequest:
        """The validated request (a chat's tools and tool choice resolved); APIError if invalid."""
        req = parse_request(ChatCompletionRequest if kind == "chat" else CompletionRequest, body)
        if req.model != self.served_name:
            raise APIError(f"model {req.model!r} does not exist", 404, param="model", code="model_not_found")
        if isinstance(req, ChatCompletionRequest):
            req._tools = validate_tools(req.tools)
            req._tool_choice = tool_choice(req.tool_choice, req._tools)
        return req

    def prompt_token_ids(self, kind: str, body: Any) -> list[list[int]]:
        """The token ids of each prompt of a "completion" or "chat" request, exactly as the
        server computes them for the engine; APIError when the request is invalid."""
        return self._prompts(self._parse(kind, body))

    def _encode(self, text: str, param: str) -> list[int]:
        if not text:
            raise APIError(f"{param} must not be empty", param=param)
        if len(text) > self.max_model_len * CHARS_PER_TOKEN_LIMIT:
            raise APIError(f"{param} is {len(text)} characters, far over the model's context of "
                           f"{self.max_model_len} tokens", param=param)
        if self.tokenizer is None:
            raise APIError("this model has no tokenizer: send token ids", param=param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(f"{param} is not valid Unicode (it holds a lone surrogate)", param=param) from None
        return self.tokenizer.encode(text, add_bos=True)

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        """The prompt's token ids: the model's chat template (or the default), as transformers
        renders and tokenizes it (special tokens in the rendered text are the control tokens)."""
        if self.tokenizer is None:
            raise APIError("this model has no tokenizer: chat needs one", param="messages")
        template = self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        try:
            # tool_choice "none": the tools stay out of the prompt, so the model is not invited
            # to write calls that would come back as text.
            tools = req._tools if req._tool_choice.mode != "none" else None
            text = render_chat(template, chat_messages(req.messages), tools=tools or None,
                               special_tokens=self.tokenizer.special_tokens, documents=req.documents,
                               add_generation_prompt=req.add_generation_prompt is not False,
                               template_kwargs=req.chat_template_kwargs)
        except ChatTemplateError as e:
            param = "chat_template_kwargs" if "chat_template_kwargs" in str(e) else "messages"
            raise APIError(str(e)[:2000], param=param) from None
        self._encode(text, "messages")  # the checks on size and Unicode; the ids come below
        return self.tokenizer.encode_with_special_tokens(text)

    def _prompts(self, req: CompletionRequest | ChatCompletionRequest) -> list[list[int]]:
        if isinstance(req, ChatCompletionRequest):
            return [self._chat_prompt(req)]
        return self._prompt_ids(req.prompt, "prompt")

    def _prompt_ids(self, value: Any, param: str) -> list[list[int]]:
        """A string, strings, token ids or lists of them -> token-id lists (at most MAX_PROMPTS,
        none empty); APIError naming ``param``."""
        if isinstance(value, str):
            return [self._encode(value, param)]
        if not value:
            raise APIError(f"{param} must not be empty", param=param)
        if isinstance(value[0], str):
            items = [self._encode(s, param) for s in value]
        elif isinstance(value[0], int):
            items = [list(value)]
        else:
            items = [list(ids) for ids in value]
        if len(items) > MAX_PROMPTS:
            raise APIError(f"at most {MAX_PROMPTS} {param}s per request, got {len(items)}", param=param)
        if any(not ids for ids in items):
            raise APIError(f"{param} must not contain an empty prompt", param=param)
        return items


class LLMServer(ModelRoutes, PromptBuilder):
    """Serves one model directory: validates requests, runs them on the engine, shapes answers.

    The routes around generation (model card, tokenize, detokenize, embeddings, health) come
    from ModelRoutes (serve/model_routes.py)."""

    def __init__(self, model_path: str, served_name: str, engine_options: dict[str, Any] | None = None,
                 default_max_tokens: int | None = None, engine: AsyncLLMEngine | None = None,
                 stream_interval_s: float = 0.0) -> None:
        self.served_name = served_name
        # Streams send a chunk at most this often (the first token and the end at once): every
        # chunk crosses the replica -> front -> proxy -> client hops, each costing CPU per message.
        self.stream_interval_s = stream_interval_s
        self.engine = engine or AsyncLLMEngine.from_model_dir(model_path, **(engine_options or {}))
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        # Prompt + output may not exceed this: the context, or a smaller KV cache.
        cap = _kv_capacity_tokens(self.engine)
        self.context_limit = self.max_model_len if cap is None else min(self.max_model_len, cap)
        # Chat without max_tokens: the rest of the context, capped by this when set.
        self.default_max_tokens = default_max_tokens
        self.metrics: Any = None  # ServerMetrics in a Serve replica
        # OpenAI's system_fingerprint: which backend answered (the Serve replica id there).
        self.fingerprint: str | None = None
        self._formatter = LogprobFormatter(self.tokenizer)
        # Engine request ids carry a per-server counter: a client's X-Request-Id (the response
        # id) may repeat, an engine id never does.
        self._engine_ids = itertools.count()

    # -- request preparation ----------------------------------------------------------------

    def _echo_texts(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """The prompt text ``echo`` puts before each choice: as sent, or token ids decoded."""
        p = req.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], str):
            return list(p)  # type: ignore[arg-type]
        if self.tokenizer is None:
            return ["" for _ in prompts]
        skip = req.skip_special_tokens is not False
        return [self.tokenizer.decode(ids, skip_special_tokens=skip) for ids in prompts]

    def _max_tokens(self, req: CompletionRequest | ChatCompletionRequest, prompt_len: int) -> int:
        if isinstance(req, CompletionRequest):
            if req.max_tokens == 0:  # scoring: the prompt's logprobs, nothing generated
                if not req.echo:
                    raise APIError("max_tokens 0 needs echo: true (it scores the prompt: echo with "
                                   "logprobs gives each prompt token's logprob)", param="max_tokens")
                return 1  # one token is generated and dropped
            return COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        mt, mct = req.max_tokens, req.max_completion_tokens
        if mt is not None and mct is not None and mt != mct:
            raise APIError(f"max_tokens ({mt}) and max_completion_tokens ({mct}) disagree; send one "
                           "(max_tokens is deprecated)", param="max_tokens")
        max_tokens = mct if mct is not None else mt
        if max_tokens is None:  # the rest of the context (capped by default_max_tokens when set)
            max_tokens = self.context_limit - prompt_len
            if self.default_max_tokens is not None:
                max_tokens = min(max_tokens, self.default_max_tokens)
            max_tokens = max(1, max_tokens)  # no room at all: the engine blames the prompt
        return max_tokens

    def _params(self, req: CompletionRequest | ChatCompletionRequest, prompt_len: int) -> SamplingParams:
        stop = req.stop
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise APIError(f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
        if isinstance(req, ChatCompletionRequest):
            if req.top_logprobs is not None and not req.logprobs:
                raise APIError("top_logprobs requires logprobs: true", param="top_logprobs")
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
            n = 1 if req.n is None else req.n
            if req.best_of is not None and req.best_of != n:
                raise APIError(f"best_of must be null or equal to n ({n}): choosing the best of more "
                               f"samples is not supported, got {req.best_of}", param="best_of")

        kwargs: dict[str, Any] = {name: getattr(req, name) for name in _PASSTHROUGH_FIELDS
                                  if getattr(req, name) is not None}
        kwargs.update(max_tokens=self._max_tokens(req, prompt_len), stop=stop or (), logprobs=logprobs,
                      structured=self._structured(req))
        if isinstance(req, CompletionRequest) and req.echo and logprobs is not None:
            kwargs["prompt_logprobs"] = logprobs  # the echoed prompt's tokens get theirs too
        if self._server_text(req):
            kwargs["stop"] = ()  # searched here, in the text the request asked for
        try:
            return SamplingParams(**kwargs)
        except RequestError as e:
            raise APIError(e.message, param=self._param_name(req, e.param)) from None

    @staticmethod
    def _structured(req: Any) -> Any:
        """The grammar the output must follow: the request's structured-output field, or the
        tool-call grammar when tool_choice forces a call."""
        spec = grammar_spec(req)
        choice = getattr(req, "_tool_choice", None)
        if choice is not None and choice.forces_a_call:
            if spec is not None:
                raise APIError(f"tool_choice {req.tool_choice!r} and {requested_field(req)} both constrain "
                               "the output; send one", param="tool_choice")
            spec = call_grammar(req._tools, choice, req.parallel_tool_calls is not False)
        return spec

    def _server_text(self, req: Any) -> bool:
        """Whether this server, not the engine, builds the request's text (see _stop_text)."""
        return self.tokenizer is not None and bool(
            req.include_stop_str_in_output or req.skip_special_tokens is False)

    @staticmethod
    def _param_name(req: Any, param: str | None) -> str | None:
        if param == "max_tokens" and getattr(req, "max_completion_tokens", None) is not None:
            return "max_completion_tokens"
        if param == "logprobs" and isinstance(req, ChatCompletionRequest):
            return "top_logprobs"
        if param == "prompt" and isinstance(req, ChatCompletionRequest):
            return "messages"
        if param == "structured_outputs":  # the field the constraint came from
            return requested_field(req) or ("tools" if getattr(req, "_tool_choice", None) else param)
        return param

    def _start(self, req: Any, prompt: list[int], params: SamplingParams, request_id: str) -> Any:
        try:
            return self.engine.generate(prompt, params, request_id=request_id)
        except RequestError as e:
            raise APIError(e.message, param=self._param_name(req, e.param)) from None
        except EngineDeadError as e:
            raise APIError(f"the engine is not running: {e}", 503, type="server_error",
                           code="engine_dead") from None

    def _start_all(self, req: Any, prompts: list[list[int]], params: list[SamplingParams],
                   request_id: str) -> list[Any]:
        """Start one engine request per prompt; if one is refused, abort those already started."""
        engine_id = f"{request_id}@{next(self._engine_ids)}"  # unique even if request_id is not
        streams: list[Any] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                streams.append(self._start(req, p, sp, f"{engine_id}-{i}"))
        except APIError:
            for stream in streams:
                self.engine.abort(stream.request_id)
            raise
        if self._server_text(req):
            streams = [self._stop_text(s, p, req, sp) for s, p, sp in zip(streams, prompts, params)]
        return streams

    async def _stop_text(self, stream: Any, prompt: list[int], req: Any,
                         params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The engine's outputs with their text rebuilt here (``include_stop_str_in_output``,
        ``skip_special_tokens: false``).

        The engine runs without the stop strings; each sample's text goes through a
        StopStringText, and when a stop string ends it the sample is finished here ("stop",
        tokens after the one that completed the stop string dropped) and aborted in the engine.
        """
        n = params.n
        texts: dict[int, tuple[StopStringText, OutputHistory]] = {}
        done: set[int] = set()
        try:
            async for out in stream:
                j = out.index
                if j in done:
                    continue  # tokens in flight after a stop here, or the engine's abort
                entry = texts.get(j)
                if entry is None:
                    entry = texts[j] = (StopStringText(
                        self.tokenizer, prompt, req.stop if isinstance(req.stop, list) else
                        ([req.stop] if req.stop else []), min_tokens=params.min_tokens,
                        include_stop_str_in_output=bool(req.include_stop_str_in_output),
                        skip_special_tokens=req.skip_special_tokens is not False),
                        OutputHistory(with_logprobs=params.logprobs is not None))
                text, history = entry
                ids = out.new_token_ids
                kept, stopped = len(ids), False
                for k, tok in enumerate(ids):
                    reason = out.finish_reason if out.finished and k == len(ids) - 1 else None
                    if text.add_token(tok, reason):
                        kept, stopped = k + 1, True
                        break
                if out.finished and not ids:
                    text.end()
                new_ids = ids[:kept]
                new_logprobs = None if out.new_logprobs is None else out.new_logprobs[:kept]
                history.token_ids.extend(new_ids)
                if history.logprobs is not None and new_logprobs is not None:
                    history.logprobs.extend(new_logprobs)
                finished = out.finished or stopped
                delta = text.take(finished)
                history.add_text(delta)
                if finished:
                    done.add(j)
                    if stopped and not out.finished and len(done) < n:
                        self.engine.abort(out.request_id)  # this sample only; the others go on
                yield dataclasses.replace(
                    out, new_token_ids=new_ids, delta_text=delta, new_logprobs=new_logprobs,
                    finished=finished, finish_reason="stop" if stopped else out.finish_reason,
                    num_output_tokens=len(history.token_ids), num_text_chars=history.num_chars,
                    _history=history)
                if len(done) == n:
                    break  # every sample is done (aclose below aborts what the engine still runs)
        finally:
            await stream.aclose()

    def _begin(self, kind: str, body: Any, request_id: str) -> tuple[Any, list[list[int]], list[Any]]:
        """Parse, validate and start a request: (request, prompts, one stream per prompt).

        An APIError is counted in the metrics before it propagates.
        """
        try:
            req, prompts, params = self._prepare(kind, body)
            return req, prompts, self._start_all(req, prompts, params, request_id)
        except APIError as e:
            self._record(None, str(e.status_code))
            raise

    def _prepare(self, kind: str, body: Any) -> tuple[Any, list[list[int]], list[SamplingParams]]:
        req = self._parse(kind, body)
        prompts = self._prompts(req)
        return req, prompts, [self._params(req, len(p)) for p in prompts]

    # -- responses ----------------------------------------------------------------------------

    def _logprobs(self, kind: str, lps: list[Any] | None, offsets: TextOffsets | None = None,
                  prompt: tuple[list[int], list[Any]] | None = None) -> dict[str, Any] | None:
        if kind == "chat":
            return self._formatter.chat(lps)
        return self._formatter.completion(lps, offsets if offsets is not None else TextOffsets(), prompt)

    def _record(self, out: RequestOutput | None, status: str, prompt_len: int = 0) -> None:
        """Count a finished sample (the prompt and its cache hits once: on sample 0), or an error."""
        if self.metrics is None:
            return
        if out is None:
            self.metrics.record_error(status)
            return
        first = out.index == 0
        self.metrics.record_request(status, out, prompt_len if first else 0,
                                    out.metrics.num_cached_tokens if first else 0)

    async def _collect(self, stream: Any, prompt_len: int) -> list[RequestOutput]:
        """The final output of each of the prompt's n samples, in sample order."""
        finals = []
        async for out in stream:
            if out.finished:
                finals.append(out)
                self._record(out, out.finish_reason or "stop", prompt_len)
        return sorted(finals, key=lambda o: o.index)

    async def generate(self, kind: str, body: Any, request_id: str | None = None) -> dict[str, Any]:
        """A whole (non-streaming) completion, or ``APIError.to_dict()``."""
        request_id = request_id or new_request_id(kind)
        try:
            req, prompts, streams = self._begin(kind, body, request_id)
        except APIError as e:
            return e.to_dict()
        try:
            per_prompt = await asyncio.gather(*(self._collect(s, len(p)) for s, p in zip(streams, prompts)))
        except EngineDeadError as e:
            self._record(None, "503")
            return APIError(f"the engine stopped: {e}", 503, type="server_error",
                            code="engine_dead").to_dict()
        n = 1 if req.n is None else req.n
        echo = self._echo_texts(req, prompts) if kind == "completion" and req.echo else None
        outs = [out for finals in per_prompt for out in finals]  # choice i * n + j: prompt i, sample j
        scoring = _scores_only(req)
        choices = []
        for i, out in enumerate(outs):
            prefix = echo[i // n] if echo else ""
            prompt = _prompt_part(prompts[i // n], out.prompt_logprobs)
            logprobs = self._logprobs(kind, None if scoring else out.logprobs,
                                      TextOffsets(0 if prompt else len(prefix)), prompt)
            choice: dict[str, Any] = {"index": i, "finish_reason": out.finish_reason, "logprobs": logprobs}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": out.text}
                if _parses_calls(req):
                    content, calls = parse_output(out.text, req._tools)
                    if calls:
                        choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                        if out.finish_reason == "stop":
                            choice["finish_reason"] = "tool_calls"
            else:
                choice["text"] = prefix + ("" if scoring else out.text)
                if scoring:
                    choice["finish_reason"] = "length"
            choices.append(choice)
        n_prompt = sum(len(p) for p in prompts)
        n_out = 0 if scoring else sum(o.num_output_tokens for o in outs)
        cached = sum(o.metrics.num_cached_tokens for o in outs if o.index == 0)
        return {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": now(), "model": self.served_name, "system_fingerprint": self.fingerprint,
                "choices": choices, "usage": usage(n_prompt, n_out, cached)}

    async def generate_stream(self, kind: str, body: Any,
                              request_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """OpenAI chunks as dicts; an error is the first and only item (``APIError.to_dict()``)."""
        request_id = request_id or new_request_id(kind)
        try:
            req, prompts, streams = self._begin(kind, body, request_id)
        except APIError as e:
            yield e.to_dict()
            return
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        created = now()

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            c = {"id": request_id, "object": obj, "created": created, "model": self.served_name,
                 "system_fingerprint": self.fingerprint, "choices": choices}
            if include_usage:
                c["usage"] = None
            return c

        n = 1 if req.n is None else req.n
        echo = self._echo_texts(req, prompts) if kind == "completion" and req.echo else None
        echoed: set[int] = set()
        if kind == "chat":
            yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for j in range(n)])
        n_out = cached = 0
        scoring = _scores_only(req)
        offsets: dict[int, TextOffsets] = {}  # choice -> its text offsets so far (completions)
        parsers = {} if kind == "chat" and _parses_calls(req) else None  # choice -> ToolCallParser
        try:
            # Choice index i * n + j: prompt i, sample j (the engine's output.index).
            choices = ((i * n + out.index, out) async for i, out in _merge(streams))
            async for i, delta in _coalesce(choices, self.stream_interval_s):
                out = delta.last
                prompt = None
                if i not in offsets:  # the choice's first chunk: after its echoed prompt, if any
                    prompt = _prompt_part(prompts[i // n], delta.prompt_logprobs)
                    offsets[i] = TextOffsets(len(echo[i // n]) if echo and not prompt else 0)
                if scoring:
                    delta.text, delta.logprobs = "", None
                logprobs = self._logprobs(kind, delta.logprobs, offsets[i], prompt)
                choice: dict[str, Any] = {"index": i, "logprobs": logprobs,
                                          "finish_reason": out.finish_reason if out.finished else None}
                if scoring and out.finished:
                    choice["finish_reason"] = "length"
                if kind == "chat" and parsers is not None:
                    choice["delta"] = _tool_delta(parsers, i, req._tools, delta.text, out.finished)
                    if out.finished and out.finish_reason == "stop" and parsers[i].calls:
                        choice["finish_reason"] = "tool_calls"
                elif kind == "chat":
                    has_text = delta.text or not out.finished
                    choice["delta"] = {"content": delta.text} if has_text else {}
                else:
                    prefix = ""
                    if echo and i not in echoed:  # the prompt opens each choice's first chunk
                        echoed.add(i)
                        prefix = echo[i // n]
                    choice["text"] = prefix + delta.text
                yield chunk([choice])
                if out.finished:
                    n_out += 0 if scoring else out.num_output_tokens
                    if out.index == 0:
                        cached += out.metrics.num_cached_tokens
                    self._record(out, out.finish_reason or "stop", len(prompts[i // n]))
        except EngineDeadError as e:
            self._record(None, "503")
            yield APIError(f"the engine stopped: {e}", 503, type="server_error", code="engine_dead").to_dict()
            return
        except asyncio.CancelledError:
            self._record(None, "499")  # the client went away; _merge aborted its requests
            raise
        if include_usage:
            yield {"id": request_id, "object": obj, "created": created, "model": self.served_name,
                   "choices": [], "usage": usage(sum(len(p) for p in prompts), n_out, cached)}

    def load(self) -> dict[str, float]:
        """The engine's load snapshot (waiting/running sequences, KV-cache use, counters)."""
        return self.engine.load_snapshot()


def _scores_only(req: Any) -> bool:
    """A completion with max_tokens 0: the echoed prompt (and its logprobs), nothing generated."""
    return isinstance(req, CompletionRequest) and req.max_tokens == 0


def _prompt_part(prompt_ids: list[int], prompt_logprobs: list[Any] | None
                 ) -> tuple[list[int], list[Any]] | None:
    """(ids, logprobs) of an echoed prompt whose logprobs came back (echo with logprobs)."""
    return None if prompt_logprobs is None else (prompt_ids, prompt_logprobs)


def _parses_calls(req: Any) -> bool:
    """Whether a chat request's output is searched for tool calls (tools given, choice not none)."""
    choice = getattr(req, "_tool_choice", None)
    return choice is not None and choice.mode != "none"


def _tool_delta(parsers: dict[int, ToolCallParser], i: int, tools: list[dict[str, Any]], text: str,
                finished: bool) -> dict[str, Any]:
    """A chat chunk's delta when the output may hold tool calls: content that is certainly
    content, and each call once its closing tag arrived (id, name and all its arguments, as
    OpenAI's first delta of a call carries them)."""
    parser = parsers.setdefault(i, ToolCallParser(tools))
    before = len(parser.calls)
    content, calls = parser.feed(text)
    if finished:
        content += parser.finish()
    delta: dict[str, Any] = {}
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = [{"index": before + k, **call} for k, call in enumerate(calls)]
    return delta


@dataclasses.dataclass
class _Delta:
    """What one stream chunk carries: the text, tokens and logprobs of one or more engine steps."""

    last: RequestOutput  # the newest output merged in (finish state, totals)
    text: str = ""
    num_tokens: int = 0
    logprobs: list[Any] | None = None  # one per merged token when logprobs were requested
    prompt_logprobs: list[Any] | None = None  # echo with logprobs: from the first output

    def add(self, out: RequestOutput) -> None:
        """Append one engine output's delta."""
        self.last = out
        if self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text += out.delta_text
        self.num_tokens += len(out.new_token_ids)
        if out.new_logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(out.new_logprobs)

    @property
    def empty(self) -> bool:
        """Nothing a client would see: no token, no text, not the end."""
        return not self.num_tokens and not self.text and not self.last.finished


async def _coalesce(items: AsyncIterator[tuple[int, RequestOutput]],
                    interval_s: float) -> AsyncIterator[tuple[int, _Delta]]:
    """Merge each stream's outputs into chunks at most ``interval_s`` apart.

    A stream's first chunk and its last go out at once (TTFT and the end are never delayed);
    in between, outputs are held and merged until the interval has passed since the stream's
    previous chunk. Held text waits for the next engine output, which a running request
    always produces (or its end does), so nothing is held for long.
    """
    pending: dict[int, _Delta] = {}
    last_sent: dict[int, float] = {}
    async for i, out in items:
        delta = pending.get(i)
        if delta is None:
            delta = pending[i] = _Delta(out)
        delta.add(out)
        if delta.empty:
            continue
        t = time.monotonic()
        if out.finished or t - last_sent.get(i, -math.inf) >= interval_s:
            del pending[i]
            last_sent[i] = t
            yield i, delta


async def _merge(streams: list[Any]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (index, output); leaving early aborts them all."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: Any) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()
