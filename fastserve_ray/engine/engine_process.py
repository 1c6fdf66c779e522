"""The engine in a process of its own: the step loop, fed and drained over one socket.

``python -m fastserve_ray.engine.engine_process FD`` is started by ``ProcessLLMEngine`` with one
end of a socket pair. Why a process: a serving replica's event loop (Ray Serve's request and
streaming machinery) and the engine's step thread share one GIL in one process, and every
small torch op the step releases the GIL for is a chance for the loop to take it for a while;
apart, the step runs undisturbed and the loop only unpacks a few tuples per step (vLLM splits
its engine core out of the API server for the same reason).

Messages are tuples (``multiprocessing.connection`` framing; both ends are this package, in
processes it started itself, so nothing a user loads is ever unpickled):

    front -> engine   ("add", request_id, prompt_ids, SamplingParams) | ("abort", request_id)
                      | ("embed", token, [prompt_ids, ...]) | ("prefix_summary", token)
                      | ("shutdown",)
    engine -> front   ("ready", info) | ("fatal", message)
                      | ("step", [packed output, ...], load snapshot)
                      | ("reject", request_id, message, param)
                      | ("embedded", token, vectors, error) | ("prefix_summary", token, summary)

A step message carries each output's deltas only (``pack_output``), never its history.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from fastserve_ray.engine.errors import RequestError
from fastserve_ray.engine.outputs import RequestOutput

_IDLE_POLL_S = 0.5  # an idle engine re-sends its load snapshot this often
_SNAPSHOT_EVERY_S = 0.05  # at most this often while stepping (the autoscaler reads ~1/s)

PackedOutput = tuple[Any, ...]


def pack_output(out: RequestOutput) -> PackedOutput:
    """What crosses the socket for one output: its deltas, counts and timing."""
    return (out.request_id, out.index, out.new_token_ids, out.delta_text, out.new_logprobs,
            out.finished, out.finish_reason, out.metrics, out.num_output_tokens, out.num_text_chars,
            out.prompt_logprobs)


def _set_parent_death_signal() -> None:
    """Linux: die with the replica even if it is SIGKILLed (no orphaned engines)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _EngineLoop:
    """Owns the LLMEngine; applies commands between steps and sends each step's outputs."""

    def __init__(self, conn: Connection, engine: Any) -> None:
        self.conn = conn
        self.engine = engine
        self._last_snapshot = 0.0
        self._stopping = False

    def _handle(self, msg: tuple[Any, ...], outputs: list[RequestOutput]) -> None:
        kind = msg[0]
        if kind == "add":
            _, request_id, prompt_ids, params = msg
            try:
                self.engine.add_request(prompt_ids, params, request_id)
            except RequestError as e:  # the front validates first; this is a last line
                self.conn.send(("reject", request_id, e.message, e.param))
        elif kind == "embed":
            _, token, prompt_ids = msg
            try:
                self.conn.send(("embedded", token, self.engine.embed(prompt_ids), None))
            except RequestError as e:
                self.conn.send(("embedded", token, None, (e.message, e.param)))
        elif kind == "prefix_summary":  # asked for by the replica's routing stats, between steps
            self.conn.send(("prefix_summary", msg[1], self.engine.prefix_cache_summary()))
        elif kind == "abort":
            out = self.engine.abort(msg[1])
            if out is not None:
                outputs.append(out)
        elif kind == "shutdown":
            self._stopping = True
        else:
            raise ValueError(f"unknown engine message {kind!r}")

    def _send(self, outputs: list[RequestOutput], force: bool) -> None:
        now = time.monotonic()
        snapshot = None
        if force or now - self._last_snapshot >= _SNAPSHOT_EVERY_S:
            snapshot, self._last_snapshot = self.engine.load_snapshot(), now
        if outputs or snapshot is not None:
            self.conn.send(("step", [pack_output(o) for o in outputs], snapshot))

    def run(self) -> None:
        """Until shutdown or the front's end of the socket closes (EOFError)."""
        engine, conn = self.engine, self.conn
        while not self._stopping:
            outputs: list[RequestOutput] = []
            busy = engine.has_unfinished()
            if conn.poll(0 if busy else _IDLE_POLL_S):
                while True:  # every command queued so far, before the next step
                    self._handle(conn.recv(), outputs)
                    if self._stopping or not conn.poll(0):
                        break
            if self._stopping:
                break
            commands_only = bool(outputs)
            if engine.has_unfinished():
                outputs.extend(engine.step())
            # A command (an abort freeing blocks) or idleness is worth a fresh snapshot now.
            self._send(outputs, force=commands_only or not busy)
        for request_id in engine.unfinished_request_ids():  # unfinished at shutdown: end their streams
            out = engine.abort(request_id)
            if out is not None:
                conn.send(("step", [pack_output(out)], None))


def main(fd: int) -> None:
    """Load the engine the front describes, report ready, then run the loop."""
    _set_parent_death_signal()
    conn = Connection(fd)
    try:
        config = conn.recv()
        t0 = time.perf_counter()
        import torch

        from fastserve_ray.engine.llm_engine import LLMEngine

        import_s = time.perf_counter() - t0

        if config.get("num_threads"):
            torch.set_num_threads(config["num_threads"])
        engine = LLMEngine.from_model_dir(config["model_path"], **config["engine_options"])
    except EOFError:
        return
    except Exception as e:  # noqa: BLE001 - reported to the front, which raises it
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"vocab_size": engine.vocab_size, "max_model_len": engine.max_model_len,
                         "kv_capacity_tokens": engine.block_manager.max_seq_len,
                         "snapshot": engine.load_snapshot(), "pid": os.getpid(),
                         "startup_s": {"import_s": import_s, **getattr(engine, "startup_s", {})}}))
    try:
        _EngineLoop(conn, engine).run()
    except (EOFError, OSError):
        return  # the front is gone
    except BaseException as e:  # a step raised: tell the front, which fails its streams
        with contextlib.suppress(Exception):
            conn.send(("fatal", f"engine step failed: {e!r}"))
        raise


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(json.dumps({"error": "usage: python -m fastserve_ray.engine.engine_process FD"}))
        sys.exit(2)
    main(int(sys.argv[1]))
