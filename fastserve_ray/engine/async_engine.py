"""Async front: a background thread steps the engine; ``generate`` streams incremental outputs.

The step is blocking torch code, so it runs on its own thread and the event loop only ever
waits for bookkeeping (adding or aborting a request takes the engine lock, which a step holds
for its schedule/postprocess phases, never for the forward). Outputs cross back with
``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per request.

A stream that goes away aborts its request and frees its blocks before control returns:
``aclose()``, a cancelled consumer task, or dropping the iterator (``break`` out of
``async for``: CPython finalizes it on the spot).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastserve_ray.engine.errors import RequestError
from fastserve_ray.engine.llm_engine import LLMEngine, Prompt
from fastserve_ray.engine.outputs import RequestOutput
from fastserve_ray.engine.sampling_params import SamplingParams, sample_request_ids

_IDLE_WAIT_S = 1.0  # the loop re-checks its stop flag this often when there is no work


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or a step raised); no request can run."""


class _Sink:
    """Where the loop thread delivers one request's outputs: a queue on the consumer's loop.

    Kept apart from the stream so that the loop thread never holds a stream: a stream its
    consumer dropped is then finalized (and its request aborted) on the spot.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Deliver from any thread."""
        _deliver_threadsafe(self.loop, [(self, item)])


def _deliver_threadsafe(loop: asyncio.AbstractEventLoop,
                        items: list[tuple[_Sink, RequestOutput | BaseException]]) -> None:
    """Queue ``items`` on their sinks from another thread: one wake-up of ``loop`` for all of them.

    Every ``call_soon_threadsafe`` wakes the loop (a write to its self-pipe) and makes the loop
    thread take the GIL from the engine thread; one per step instead of one per request keeps
    the engine thread's step from being interrupted ``batch size`` times.
    """

    def deliver() -> None:
        for sink, item in items:
            sink.queue.put_nowait(item)

    # RuntimeError: the consumer's loop is closed, nobody is listening any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(deliver)


class RequestStream:
    """Async iterator over one request's RequestOutputs; leaving it early aborts the request.

    With ``n`` > 1 samples the outputs of all n interleave (``output.index`` tells them apart,
    ``output.request_id`` is the sample's own id); the stream ends when all n have finished.
    """

    def __init__(self, engine: AsyncLLMEngine, request_id: str, sink: _Sink, n: int = 1) -> None:
        self.request_id = request_id
        self._engine = engine
        self._sink = sink
        self._num_unfinished = n
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._sink.queue.get()
        except BaseException:  # CancelledError: the consumer went away mid-request
            self._cancel()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._num_unfinished -= 1
            self._done = self._num_unfinished == 0
        return item

    def _cancel(self) -> None:
        if not self._done:
            self._done = True
            self._engine._forget_and_abort(self.request_id)

    async def aclose(self) -> None:
        """Stop streaming; an unfinished request is aborted and its blocks freed."""
        self._cancel()

    def __del__(self) -> None:
        # At interpreter shutdown the engine may already be torn down.
        with contextlib.suppress(Exception):
            self._cancel()


class AsyncLLMEngine:
    """LLMEngine on a background thread, with per-request async streams."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._init_streams()
        self._thread = threading.Thread(target=self._run, name="llm-engine-loop", daemon=True)
        self._thread.start()

    def _init_streams(self) -> None:
        self._sinks: dict[str, _Sink] = {}  # unfinished requests with a listening stream
        self._children: dict[str, list[str]] = {}  # n > 1: request id -> its samples' ids
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None

    @classmethod
    def from_model_dir(cls, path: str | Path, **kwargs: Any) -> AsyncLLMEngine:
        """Load a model directory into an LLMEngine (same arguments) and start its loop."""
        return cls(LLMEngine.from_model_dir(path, **kwargs))

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer (None for a model without one)."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output the engine accepts, in tokens."""
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (its logits' width)."""
        return self.engine.vocab_size

    def load_snapshot(self) -> dict[str, float]:
        """The engine's load and counters (``LLMEngine.load_snapshot``)."""
        return self.engine.load_snapshot()

    @property
    def is_running(self) -> bool:
        """Whether the loop thread is alive and accepting requests."""
        return self._thread.is_alive() and not self._stopping

    async def embed(self, prompts: list[Prompt]) -> list[list[float]]:
        """``LLMEngine.embed`` off the event loop; RequestError names a bad prompt."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        return await asyncio.to_thread(self.engine.embed, prompts)

    # -- the loop thread ----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._wake.clear()  # before the check, so a request added after it wakes us
            if not engine.has_unfinished():
                self._wake.wait(_IDLE_WAIT_S)
                continue
            try:
                outputs = engine.step()
            except BaseException as e:  # a bug: fail every stream loudly, accept no more
                self._error = e
                self._fail_all(EngineDeadError(f"engine step failed: {e!r}"))
                return
            self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, RequestOutput | BaseException]]] = {}
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue  # its stream was dropped; the request is (being) aborted
            if output.finished:
                self._sinks.pop(output.request_id, None)
                self._forget_child(output.request_id)
            by_loop.setdefault(sink.loop, []).append((sink, output))
        for loop, items in by_loop.items():
            _deliver_threadsafe(loop, items)

    def _forget_child(self, child_id: str) -> None:
        parent = child_id.rpartition("-")[0]
        children = self._children.get(parent)
        if children is not None and not any(c in self._sinks for c in children):
            del self._children[parent]

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._sinks):
            sink = self._sinks.pop(request_id, None)
            self.engine.abort(request_id)
            if sink is not None:
                sink.put(error)

    # -- requests -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Start a request; iterate the result (``async for``) for incremental RequestOutputs.

        Call from a coroutine. Validation errors (RequestError) raise here, before streaming.
        """
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running") from self._error
        params = LLMEngine._as_params(params)
        if request_id is None:
            request_id = f"async-{next(self._ids)}"
        ids = sample_request_ids(request_id, params.n)
        for taken in {request_id, *ids}:
            if taken in self._sinks or taken in self._children:
                raise RequestError(f"request_id {taken!r} is already running", "request_id")
        sink = _Sink()
        for child in ids:  # before adding: the first output may come at once
            self._sinks[child] = sink
        if params.n > 1:
            self._children[request_id] = ids
        try:
            self._submit(prompt, params, request_id)
        except BaseException:
            for child in ids:
                self._sinks.pop(child, None)
            self._children.pop(request_id, None)
            raise
        self._wake.set()
        return RequestStream(self, request_id, sink, params.n)

    def _submit(self, prompt: Prompt, params: SamplingParams, request_id: str) -> None:
        """Hand a validated request to the engine (RequestError if it refuses it)."""
        self.engine.add_request(prompt, params, request_id)

    def _forget_and_abort(self, request_id: str) -> None:
        """A stream went away: drop its sinks and abort its engine requests (no output sent)."""
        for child in self._children.pop(request_id, [request_id]):
            self._sinks.pop(child, None)
        self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request now (blocks freed); its stream ends with finish_reason "abort"."""
        for child in self._children.pop(request_id, [request_id]):
            output = self.engine.abort(child)
            sink = self._sinks.pop(child, None)
            if sink is not None and output is not None:
                sink.put(output)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop thread; unfinished requests are aborted and their streams ended."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        for request_id in list(self._sinks):
            self.abort(request_id)
        self._children.clear()

    async def __aenter__(self) -> AsyncLLMEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)
