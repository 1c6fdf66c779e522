"""Streamed logprobs (read from each output's new_logprobs) concatenate to the whole response's."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastserve_ray.serve.server import LLMServer


def test_streamed_logprobs_concatenate_to_the_whole(tiny_model_dir: Path) -> None:
    server = LLMServer(str(tiny_model_dir), "tiny", {"max_num_seqs": 2})
    body = {"model": "tiny", "prompt": "one", "max_tokens": 6, "temperature": 0, "logprobs": 2}

    async def run() -> tuple[dict, list[dict]]:
        whole = await server.generate("completion", body)
        chunks = [c async for c in server.generate_stream("completion", {**body, "stream": True})]
        return whole, chunks

    try:
        whole, chunks = asyncio.run(run())
    finally:
        server.engine.shutdown()
    streamed = [lp for c in chunks if c["choices"] for lp in c["choices"][0]["logprobs"]["token_logprobs"]]
    expected = whole["choices"][0]["logprobs"]["token_logprobs"]
    assert len(expected) == whole["usage"]["completion_tokens"] and streamed == expected
