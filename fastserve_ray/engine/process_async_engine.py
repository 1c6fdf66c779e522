"""AsyncLLMEngine whose engine runs in a child process (``engine_process``); same streams.

The front validates a request completely before sending it (the same checks and messages as
``LLMEngine.add_request``, from the limits the child reports when it is ready), so
``generate`` still raises RequestError before streaming. A reader thread turns each step
message back into RequestOutputs, each request keeping its own append-only history here, and
hands them to the consumers' loops in one wake-up per step, as the in-process engine does.
If the child dies, every stream fails with EngineDeadError and ``is_running`` turns False
(a serving replica's health check then fails and Serve replaces it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastserve_ray.engine.async_engine import AsyncLLMEngine, EngineDeadError
from fastserve_ray.engine.engine_process import PackedOutput
from fastserve_ray.engine.errors import RequestError
from fastserve_ray.engine.grammars import EngineGrammars
from fastserve_ray.engine.llm_engine import Prompt, tokenize_prompt
from fastserve_ray.engine.outputs import OutputHistory, RequestOutput
from fastserve_ray.engine.sampling_params import (
    SamplingParams,
    sample_request_ids,
    validate_prompt,
    validate_request,
)
from fastserve_ray.engine.scheduler import kv_capacity_error
from fastserve_ray.models.model_dir import TOKENIZER_FILE
from fastserve_ray.models.model_store import local_model_dir
from fastserve_ray.tokenizer import Tokenizer

_READY_TIMEOUT_S = 900.0  # loading (and compiling, when asked) the model in the child


class ProcessLLMEngine(AsyncLLMEngine):
    """The engine loop in its own process; ``generate``/``abort``/``shutdown`` as AsyncLLMEngine."""

    def __init__(self, model_path: str | Path, engine_options: dict[str, Any] | None = None,
                 num_threads: int | None = None) -> None:
        from multiprocessing.connection import Connection

        self._init_streams()
        self.engine = None  # nothing to reach in this process; see the properties below
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fastserve_ray.engine.engine_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._histories: dict[str, tuple[list[int], OutputHistory]] = {}
        self._send({"model_path": str(model_path), "engine_options": dict(engine_options or {}),
                    "num_threads": num_threads})
        started = time.perf_counter()
        info = self._wait_ready()
        # Spawn to ready, and inside the child: imports, model load, engine build.
        self.startup_s: dict[str, float] = {"engine_process_s": time.perf_counter() - started,
                                            **info.get("startup_s", {})}
        self._vocab_size: int = info["vocab_size"]
        self._max_model_len: int = info["max_model_len"]
        self._kv_capacity_tokens: int = info["kv_capacity_tokens"]
        self._snapshot: dict[str, float] = info["snapshot"]
        self.pid: int = info["pid"]
        # The child loaded (and checksum-verified) the same file; prompts are tokenized here.
        tokenizer_file = local_model_dir(model_path) / TOKENIZER_FILE
        self._tokenizer = Tokenizer.load(tokenizer_file) if tokenizer_file.exists() else None
        self._grammars = EngineGrammars(self._tokenizer, self.vocab_size)
        self._embeds: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._embed_ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="llm-engine-reader", daemon=True)
        self._thread.start()

    def _wait_ready(self) -> dict[str, Any]:
        try:
            if not self._conn.poll(_READY_TIMEOUT_S):
                raise RuntimeError(f"the engine process did not start within {_READY_TIMEOUT_S:.0f} s")
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.wait()
            raise RuntimeError(f"the engine process exited during start-up (exit code {code})") from None
        except BaseException:
            self._proc.kill()
            raise
        if kind != "ready":
            self._proc.wait()
            raise RuntimeError(f"the engine process failed to start: {payload}")
        return payload

    # -- what LLMServer reads -------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The model directory's tokenizer, loaded in this process too (None without one)."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (reported by the engine process at start)."""
        return self._vocab_size

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output the engine accepts, in tokens."""
        return self._max_model_len

    def load_snapshot(self) -> dict[str, float]:
        """The newest load snapshot the engine sent (at most ~50 ms old while it steps)."""
        return dict(self._snapshot)

    @property
    def is_running(self) -> bool:
        """Whether the engine process and the reader thread are alive."""
        return self._thread.is_alive() and not self._stopping and self._proc.poll() is None

    # -- the reader thread ------------------------------------------------------------------------

    def _run(self) -> None:
        reason = "the engine process exited"
        try:
            while True:
                msg = self._conn.recv()
                kind = msg[0]
                if kind == "step":
                    if msg[2] is not None:
                        self._snapshot = msg[2]
                    self._dispatch([self._unpack(p) for p in msg[1]])
                elif kind == "reject":
                    _, request_id, message, param = msg
                    self._histories.pop(request_id, None)
                    sink = self._sinks.pop(request_id, None)
                    if sink is not None:
                        sink.put(RequestError(message, param))
                elif kind == "embedded":
                    _, token, vectors, error = msg
                    self._resolve_embed(token, vectors if error is None else RequestError(*error))
                elif kind == "prefix_summary":  # answers travel under the same tokens as embed's
                    self._resolve_embed(msg[1], msg[2])
                elif kind == "fatal":
                    reason = msg[1]
        except (EOFError, OSError):
            pass
        except BaseException as e:  # a bug here: fail every stream loudly
            reason = f"the engine reader failed: {e!r}"
        self._error = EngineDeadError(reason)
        code = self._exit_code()
        detail = reason if self._stopping or code is None else f"{reason} (exit code {code})"
        self._fail_all(EngineDeadError(detail))
        for token in list(self._embeds):
            self._resolve_embed(token, EngineDeadError(detail))

    def _exit_code(self) -> int | None:
        """The dead process's exit code. The pipe closes as the process dies, a moment before
        the OS can report its status, so wait a little for it (None if it still lives on)."""
        if self._stopping:
            return self._proc.poll()
        try:
            return self._proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return None

    def _unpack(self, p: PackedOutput) -> RequestOutput:
        (request_id, index, new_ids, delta_text, new_logprobs, finished, finish_reason, metrics,
         num_output_tokens, num_text_chars, prompt_logprobs) = p
        entry = self._histories.get(request_id)
        if entry is None:  # its stream was dropped: no history kept, the deltas still make sense
            entry = ([], OutputHistory(with_logprobs=new_logprobs is not None))
        prompt_ids, history = entry
        history.token_ids.extend(new_ids)
        if history.logprobs is not None and new_logprobs is not None:
            history.logprobs.extend(new_logprobs)
        history.add_text(delta_text)
        if finished:
            self._histories.pop(request_id, None)
        return RequestOutput(
            request_id=request_id, prompt_token_ids=prompt_ids, new_token_ids=new_ids,
            delta_text=delta_text, new_logprobs=new_logprobs, finished=finished,
            finish_reason=finish_reason, metrics=metrics, index=index,
            num_output_tokens=num_output_tokens, num_text_chars=num_text_chars, _history=history,
            prompt_logprobs=prompt_logprobs)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._sinks):
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                sink.put(error)
        self._histories.clear()

    # -- requests ---------------------------------------------------------------------------------

    def _send(self, msg: Any) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError as e:
            raise EngineDeadError(f"the engine process is gone: {e}") from None

    def _submit(self, prompt: Prompt, params: SamplingParams, request_id: str) -> None:
        ids = validate_request(tokenize_prompt(prompt, self._tokenizer), params,
                               vocab_size=self.vocab_size, max_model_len=self._max_model_len)
        self._grammars.check(params)  # a bad schema is refused here, not in the engine process
        if len(ids) + params.max_tokens > self._kv_capacity_tokens:
            raise kv_capacity_error(len(ids), params.max_tokens, self._kv_capacity_tokens)
        children = sample_request_ids(request_id, params.n)
        for child in children:  # before sending: the first output may come at once
            self._histories[child] = (ids, OutputHistory(with_logprobs=params.logprobs is not None))
        try:
            self._send(("add", request_id, ids, params))
        except BaseException:
            for child in children:
                self._histories.pop(child, None)
            raise

    async def embed(self, prompts: list[Prompt]) -> list[list[float]]:
        """Embeddings computed in the engine process (between two of its steps)."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        ids = [validate_prompt(tokenize_prompt(p, self._tokenizer), max_tokens=0,
                               vocab_size=self.vocab_size, max_model_len=self._max_model_len)
               for p in prompts]
        loop = asyncio.get_running_loop()
        token = next(self._embed_ids)
        future: asyncio.Future = loop.create_future()
        self._embeds[token] = (loop, future)
        try:
            self._send(("embed", token, ids))
        except BaseException:
            self._embeds.pop(token, None)
            raise
        return await future

    async def prefix_cache_summary(self) -> dict[str, Any]:
        """The engine process's prefix-cache summary (LLMEngine.prefix_cache_summary), built
        between two of its steps; the replica's routing stats ask for it every few seconds."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        token = next(self._embed_ids)
        future: asyncio.Future = loop.create_future()
        self._embeds[token] = (loop, future)
        try:
            self._send(("prefix_summary", token))
        except BaseException:
            self._embeds.pop(token, None)
            raise
        return await future

    def _resolve_embed(self, token: int, result: Any) -> None:
        entry = self._embeds.pop(token, None)
        if entry is None:
            return
        loop, future = entry

        def settle() -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
            loop.call_soon_threadsafe(settle)

    def _forget_and_abort(self, request_id: str) -> None:
        for child in self._children.pop(request_id, [request_id]):
            self._sinks.pop(child, None)
            self._histories.pop(child, None)
            if self.is_running:
                self._send(("abort", child))

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with finish_reason "abort" when the engine confirms."""
        for child in self._children.get(request_id, [request_id]):
            self._send(("abort", child))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine process (unfinished streams end with "abort"), then the reader."""
        if self._proc.poll() is None:
            with contextlib.suppress(EngineDeadError):
                self._send(("shutdown",))
        self._thread.join(timeout)  # the child aborts what is left, sends it, and exits
        self._stopping = True
        try:
            self._proc.wait(timeout=max(1.0, timeout / 3))
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()
        self._fail_all(EngineDeadError("the engine was shut down"))
        self._children.clear()
