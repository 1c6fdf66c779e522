"""ProcessLLMEngine: the engine loop in a child process streams what the in-process engine does.

One child process (the tiny model) serves every test in this module; each test checks the
engine is back to idle (no request, no KV block in use) when it ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from fastserve_ray.engine import EngineDeadError, LLMEngine, RequestError, SamplingParams
from fastserve_ray.engine.process_async_engine import ProcessLLMEngine

OPTIONS = {"max_num_seqs": 4, "num_blocks": 14}
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def proc_engine(tiny_model_dir):
    engine = ProcessLLMEngine(tiny_model_dir, OPTIONS, num_threads=1)
    yield engine
    engine.shutdown()


def _idle(engine: ProcessLLMEngine, timeout: float = 10.0) -> dict[str, float]:
    """The engine's snapshot once it reports no request and no KV block in use."""
    deadline = time.monotonic() + timeout
    while True:
        snap = engine.load_snapshot()
        if snap["num_unfinished_requests"] == 0 and snap["kv_cache_usage"] == 0:
            return snap
        assert time.monotonic() < deadline, f"engine not idle: {snap}"
        time.sleep(0.05)


def _collect(engine, prompt, params, request_id=None):
    async def main():
        return [o async for o in engine.generate(prompt, params, request_id)]

    return asyncio.run(main())


def test_greedy_text_equals_the_in_process_engine(proc_engine, tiny_model_dir):
    reference = LLMEngine.from_model_dir(tiny_model_dir, **OPTIONS)
    prompts = ["The for statement", "Lists and tuples", "x"]
    want = reference.generate(prompts, GREEDY)

    async def main():
        async def one(p):
            return [o async for o in proc_engine.generate(p, GREEDY)]
        return await asyncio.gather(*(one(p) for p in prompts))

    for outs, ref in zip(asyncio.run(main()), want):
        final = outs[-1]
        assert final.finished and final.finish_reason == "length"
        assert final.token_ids == ref.token_ids and final.text == ref.text
        assert "".join(o.delta_text for o in outs) == ref.text  # deltas rebuild the text
        assert final.num_output_tokens == 12 and final.prompt_token_ids == ref.prompt_token_ids
        assert final.metrics.time_to_first_token > 0
    _idle(proc_engine)


def test_n_samples_and_logprobs_cross_the_process(proc_engine):
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=3, n=3, logprobs=2, ignore_eos=True)
    outs = _collect(proc_engine, "sampled three times", params)
    finals = sorted((o for o in outs if o.finished), key=lambda o: o.index)
    assert [o.index for o in finals] == [0, 1, 2]
    for o in finals:
        assert len(o.token_ids) == 6 and len(o.logprobs) == 6
        assert all(len(lp.top_logprobs) == 2 for lp in o.logprobs)
    _idle(proc_engine)


def test_bad_requests_raise_before_streaming_with_the_engines_messages(proc_engine, tiny_model_dir):
    reference = LLMEngine.from_model_dir(tiny_model_dir, **OPTIONS)
    too_long = SamplingParams(max_tokens=10_000)
    cases = [([1, 2, 10**6], SamplingParams()), ([], SamplingParams()), ([1, 2], too_long),
             ([1, 2], SamplingParams(max_tokens=230))]  # the last: over the KV cache (14 blocks)

    async def main():
        for prompt, params in cases:
            with pytest.raises(RequestError) as ours:
                proc_engine.generate(prompt, params)
            with pytest.raises(RequestError) as theirs:
                reference.add_request(prompt, params)
            assert (ours.value.message, ours.value.param) == (theirs.value.message, theirs.value.param)

    asyncio.run(main())
    assert proc_engine.is_running


def test_leaving_a_stream_aborts_the_request_in_the_child(proc_engine):
    params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)

    async def main():
        stream = proc_engine.generate("walk away", params)
        async for out in stream:
            if out.num_output_tokens >= 3:
                break
        await stream.aclose()
        busy = proc_engine.load_snapshot()
        return busy

    asyncio.run(main())
    snap = _idle(proc_engine)
    assert snap["num_generated_tokens"] < 150 * 2


def test_abort_ends_the_stream_with_reason_abort(proc_engine):
    params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)

    async def main():
        outs = []
        async for out in proc_engine.generate("stop me", params, request_id="abort-me"):
            outs.append(out)
            if len(outs) == 2:
                proc_engine.abort("abort-me")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert outs[-1].num_output_tokens < 150
    _idle(proc_engine)


def test_a_killed_engine_process_fails_streams_and_reports_not_running(tiny_model_dir):
    engine = ProcessLLMEngine(tiny_model_dir, OPTIONS, num_threads=1)
    params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)

    async def main():
        with pytest.raises(EngineDeadError, match="exit code"):
            async for out in engine.generate("doomed", params):
                if out.num_output_tokens == 2:
                    os.kill(engine.pid, signal.SIGKILL)

    try:
        asyncio.run(main())
        assert not engine.is_running

        async def after():
            with pytest.raises(EngineDeadError):
                engine.generate("too late", params)

        asyncio.run(after())
    finally:
        engine.shutdown(timeout=5)


def test_a_bad_model_directory_fails_at_start_with_the_loaders_message(tmp_path):
    with pytest.raises(RuntimeError, match="failed to start: ModelDirError: .*manifest.json is missing"):
        ProcessLLMEngine(tmp_path, {})
