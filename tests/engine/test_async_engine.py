"""AsyncLLMEngine: streaming, concurrency, and leaving a stream early frees its blocks at once."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from model_helpers import make_engine, reference_greedy, scripted_engine, tiny_model

from fastserve_ray.engine import AsyncLLMEngine, EngineDeadError, RequestError, SamplingParams

LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(salt * 89 + 7 * j + 3) % 512 for j in range(n)]


def run(coro_fn, engine) -> None:
    """Run ``coro_fn(async_engine)`` on a fresh event loop; always shut the engine down."""
    async_engine = AsyncLLMEngine(engine)

    async def main() -> None:
        try:
            await asyncio.wait_for(coro_fn(async_engine), timeout=60)
        finally:
            async_engine.shutdown()

    asyncio.run(main())


def _all_free(engine) -> bool:
    bm = engine.block_manager
    return bm.num_free_blocks == bm.num_blocks


def test_streaming_yields_growing_outputs(tiny_tokenizer):
    text = "streamed, token by token: ✓"
    engine, prompt = scripted_engine(tiny_tokenizer, text)

    async def body(aengine: AsyncLLMEngine) -> None:
        outputs = [o async for o in aengine.generate(prompt, SamplingParams(max_tokens=64))]
        assert len(outputs) == len(tiny_tokenizer.encode(text)) + 1  # one per token, EOS last
        joined, tokens = "", []
        for out in outputs:
            joined += out.delta_text
            tokens += out.new_token_ids
            assert out.text == joined and out.token_ids == tokens and len(out.new_token_ids) == 1
        assert outputs[-1].finished and outputs[-1].text == text
        assert not any(o.finished for o in outputs[:-1])

    run(body, engine)


def test_concurrent_requests_all_complete_with_the_reference_tokens():
    model = tiny_model("tiny")
    engine = make_engine(model, num_blocks=24, max_num_batched_tokens=16, max_num_seqs=4)
    prompts = [_prompt(n, i) for i, n in enumerate([3, 30, 11, 50, 1, 22])]
    lengths = [10, 4, 16, 7, 12, 9]

    async def one(aengine: AsyncLLMEngine, prompt, n) -> list[int]:
        last = None
        async for out in aengine.generate(prompt, SamplingParams(max_tokens=n, temperature=0)):
            last = out
        assert last.finish_reason == "length"
        return last.token_ids

    async def body(aengine: AsyncLLMEngine) -> None:
        got = await asyncio.gather(*(one(aengine, p, n) for p, n in zip(prompts, lengths)))
        assert got == [reference_greedy(model, p, n) for p, n in zip(prompts, lengths)]
        assert _all_free(engine) and not engine.has_unfinished()

    run(body, engine)


@pytest.mark.parametrize("how", ["aclose", "break", "cancel"])
def test_leaving_a_stream_aborts_and_frees_blocks_at_once(how):
    engine = make_engine(tiny_model("tiny"), num_blocks=40)

    async def body(aengine: AsyncLLMEngine) -> None:
        stream = aengine.generate(_prompt(20), LONG)
        if how == "aclose":
            await stream.__anext__()
            await stream.__anext__()
            assert not _all_free(engine)
            await stream.aclose()
        elif how == "break":
            async for out in stream:
                if len(out.token_ids) >= 2:
                    break
            assert not _all_free(engine)
            del stream  # the last reference: `async for` held no other
        else:
            got = []

            async def consume() -> None:
                async for out in stream:
                    got.append(out)

            task = asyncio.create_task(consume())
            while len(got) < 2:
                await asyncio.sleep(0.001)
            assert not _all_free(engine)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # No await since: the abort happened synchronously in the close / cancellation path.
        assert _all_free(engine) and not engine.has_unfinished()

    run(body, engine)


def test_abort_ends_the_stream_with_reason_abort_and_others_continue():
    engine = make_engine(tiny_model("tiny"), num_blocks=40)

    async def body(aengine: AsyncLLMEngine) -> None:
        victim = aengine.generate(_prompt(9), LONG, request_id="victim")
        other = aengine.generate(_prompt(5, 1), SamplingParams(max_tokens=6, temperature=0))
        first = await victim.__anext__()
        assert not first.finished
        aengine.abort("victim")
        rest = [o async for o in victim]
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        outs = [o async for o in other]
        assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 6
        assert _all_free(engine)

    run(body, engine)


def test_validation_errors_raise_at_the_call_and_shutdown_ends_streams():
    engine = make_engine(tiny_model("tiny"), num_blocks=40)

    async def body(aengine: AsyncLLMEngine) -> None:
        with pytest.raises(RequestError) as e:
            aengine.generate([1, 2], {"temperature": 9})
        assert e.value.param == "temperature"
        stream = aengine.generate(_prompt(4), LONG, request_id="r")
        with pytest.raises(RequestError) as e:
            aengine.generate(_prompt(4), LONG, request_id="r")
        assert e.value.param == "request_id"
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, aengine.shutdown)
        rest = [o async for o in stream]
        assert rest and rest[-1].finish_reason == "abort"
        assert _all_free(engine)
        with pytest.raises(EngineDeadError):
            aengine.generate([1], LONG)

    run(body, engine)
