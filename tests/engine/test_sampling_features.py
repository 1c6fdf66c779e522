"""Sampling features clients send: penalties, min_tokens, and n > 1 samples sharing the prompt."""

from __future__ import annotations

import asyncio

import pytest
import torch
from model_helpers import make_engine, reference_greedy, scripted_engine, tiny_model

from fastserve_ray.engine import AsyncLLMEngine, LLMEngine, RequestError, Sampler, SamplingParams
from fastserve_ray.engine.sampler import apply_penalties
from fastserve_ray.engine.sampling_params import sample_request_ids
from fastserve_ray.engine.sequence import Sequence

VOCAB = 512


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(salt * 31 + 11 * j + 5) % VOCAB for j in range(n)]


def _assert_all_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.end_step()
    assert not engine.has_unfinished() and not engine.scheduler.has_unfinished()
    assert not engine._held_siblings and not engine._children
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize(("params", "param", "fragment"), [
    ({"presence_penalty": 2.5}, "presence_penalty", "got 2.5"),
    ({"presence_penalty": "x"}, "presence_penalty", "got 'x'"),
    ({"frequency_penalty": -3}, "frequency_penalty", "got -3"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty", "got inf"),
    ({"repetition_penalty": 0}, "repetition_penalty", "got 0"),
    ({"repetition_penalty": 2.1}, "repetition_penalty", "got 2.1"),
    ({"min_tokens": -1}, "min_tokens", "got -1"),
    ({"min_tokens": 17, "max_tokens": 16}, "min_tokens", "max_tokens=16"),
    ({"min_tokens": 1.5}, "min_tokens", "got 1.5"),
    ({"n": 0}, "n", "got 0"),
    ({"n": 129}, "n", "got 129"),
    ({"n": True}, "n", "got True"),
])
def test_bad_values_are_rejected_naming_the_parameter(params, param, fragment):
    engine = make_engine(tiny_model("tiny"))
    with pytest.raises(RequestError) as e:
        engine.add_request([1, 2, 3], params)
    assert e.value.param == param and fragment in str(e.value)
    _assert_all_free(engine)


def _seq(prompt: list[int], outputs: list[int]) -> Sequence:
    seq = Sequence(prompt)
    for tok in outputs:
        seq.append_token(tok)
    return seq


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0]])
    seq = _seq([0, 1], [3, 3, 2])  # prompt has 0 and 1; outputs 3 twice, 2 once
    rep = apply_penalties(logits, [seq], [SamplingParams(repetition_penalty=2.0)])
    assert rep.tolist() == [[1.0, -2.0, 0.25, 0.5, 0.0]]  # seen: positive / 2, negative * 2
    freq = apply_penalties(logits, [seq], [SamplingParams(frequency_penalty=0.5)])
    assert freq.tolist() == [[2.0, -1.0, 0.0, 0.0, 0.0]]  # minus 0.5 per occurrence in outputs
    pres = apply_penalties(logits, [seq], [SamplingParams(presence_penalty=-0.5)])
    assert pres.tolist() == [[2.0, -1.0, 1.0, 1.5, 0.0]]  # plus 0.5 once per output token


def test_penalties_change_the_pick_only_for_their_row_and_logprobs_stay_raw():
    logits = torch.tensor([[1.0, 3.0, 2.9, 0.0]] * 2)
    seqs = [_seq([1], []), _seq([1], [])]
    params = [SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=0),
              SamplingParams(temperature=0, logprobs=0)]
    out = Sampler()(logits, params, [None, None], seqs)
    assert out.token_ids == [2, 1]  # 3.0 / 1.5 = 2.0 < 2.9
    raw = logits[0].log_softmax(-1)[2].item()
    assert out.logprobs[0].logprob == pytest.approx(raw)
    with pytest.raises(ValueError, match="seqs"):
        Sampler()(logits, params, [None, None])


def test_min_tokens_bans_eos_and_stop_ids_only_below_the_minimum():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]])  # EOS = 2 is the argmax, 3 a stop id
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    sampler = Sampler(eos_token_id=2)
    assert sampler(logits, [params], [None], [_seq([0], [4])]).token_ids == [4]
    assert sampler(logits, [params], [None], [_seq([0], [4, 4])]).token_ids == [2]
    ignore = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)  # EOS is no stop then
    assert sampler(logits, [ignore], [None], [_seq([0], [])]).token_ids == [2]


def test_min_tokens_keeps_generating_past_eos_and_stop_strings(tiny_tokenizer):
    text = "hello world. hello world."
    engine, prompt = scripted_engine(tiny_tokenizer, text)
    script = tiny_tokenizer.encode(text)
    first = tiny_tokenizer.encode("hello world.")
    assert script[: len(first)] == first
    out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop="world",
                                                 min_tokens=len(first) + 1))[0]
    assert out.text == "hello world. hello " and out.finish_reason == "stop"
    # Past the script the model only wants EOS: banned until min_tokens, then it stops.
    out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=40,
                                                 min_tokens=len(script) + 3))[0]
    assert len(out.token_ids) == len(script) + 4 and out.finish_reason == "stop"
    assert tiny_tokenizer.eos_id not in out.token_ids[:-1] and out.token_ids[-1] == tiny_tokenizer.eos_id
    _assert_all_free(engine)


def test_repetition_penalty_changes_greedy_text_in_the_engine():
    model = tiny_model("tiny")
    prompt = _prompt(10)
    plain = make_engine(model).generate(prompt, SamplingParams(temperature=0, max_tokens=30,
                                                               ignore_eos=True))[0].token_ids
    assert plain == reference_greedy(model, prompt, 30)
    assert len(set(plain)) < 30  # a random tiny model repeats itself
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=2.0,
                            repetition_penalty=2.0)
    penalised = make_engine(model).generate(prompt, params)[0].token_ids
    assert penalised != plain and len(set(penalised)) > len(set(plain))


def test_n_samples_are_child_requests_sharing_the_prompt_blocks():
    model = tiny_model("tiny")
    prompt = _prompt(21)  # block_size 8: two full prompt blocks to share
    engine = make_engine(model)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=7, n=3)
    outs = engine.generate([prompt, _prompt(5, 1)], [params, SamplingParams(max_tokens=3)])
    assert [o.request_id for o in outs] == [*sample_request_ids("req-0", 3), "req-1"]
    assert [o.index for o in outs] == [0, 1, 2, 0]
    assert [o.metrics.num_cached_tokens for o in outs[:3]] == [0, 16, 16]
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3
    # Sample i is the single request seeded with seed + i, whatever shares its batch.
    for i, out in enumerate(outs[:3]):
        alone = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=7 + i)
        assert make_engine(model).generate(prompt, alone)[0].token_ids == out.token_ids
    greedy = make_engine(model).generate(prompt, SamplingParams(temperature=0, max_tokens=6,
                                                                 ignore_eos=True, n=2))
    assert [o.token_ids for o in greedy] == [reference_greedy(model, prompt, 6)] * 2
    _assert_all_free(engine)


@pytest.mark.parametrize("when", ["held", "running"])
def test_aborting_an_n_request_aborts_every_sample(when):
    engine = make_engine(tiny_model("tiny"))
    rid = engine.add_request(_prompt(30), SamplingParams(max_tokens=50, ignore_eos=True, n=3), "r")
    assert rid == "r"
    with pytest.raises(RequestError, match="'r-1' is already running"):
        engine.add_request([1, 2], None, "r-1")
    if when == "running":
        while len({o.request_id for o in engine.step()}) < 3:
            pass
    else:
        assert engine._held_siblings  # the others wait for the first's prompt KV
    out = engine.abort("r")
    assert out is not None and out.finish_reason == "abort" and out.request_id == "r-0"
    _assert_all_free(engine)
    assert engine.abort("r") is None


def test_recurrent_models_run_n_samples_without_prefix_sharing():
    model = tiny_model("gru-tiny")
    engine = make_engine(model)
    outs = engine.generate(_prompt(9), SamplingParams(temperature=0, max_tokens=5, n=2,
                                                      ignore_eos=True))
    assert [o.token_ids for o in outs] == [reference_greedy(model, _prompt(9), 5)] * 2
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_async_stream_interleaves_the_n_samples_and_ends_after_all():
    engine = make_engine(tiny_model("tiny"))
    async_engine = AsyncLLMEngine(engine)

    async def main() -> list:
        stream = async_engine.generate(_prompt(17), SamplingParams(max_tokens=4, n=2, seed=1,
                                                                   ignore_eos=True), "a")
        return [out async for out in stream]

    try:
        outs = asyncio.run(asyncio.wait_for(main(), timeout=60))
    finally:
        async_engine.shutdown()
    finals = {o.index: o for o in outs if o.finished}
    assert set(finals) == {0, 1} and {o.request_id for o in finals.values()} == {"a-0", "a-1"}
    assert all(len(o.token_ids) == 4 for o in finals.values())
    assert not async_engine._sinks and not async_engine._children
