"""LLMEngine: validation, stops, text streaming, logprobs, seeded sampling, aborts, accounting."""

from __future__ import annotations

import math
import random

import pytest
import torch
from model_helpers import (
    make_engine,
    reference_greedy,
    reference_logprobs,
    scripted_engine,
    tiny_model,
)

from fastserve_ray.engine import EngineConfig, LLMEngine, RequestError, SamplingParams
from fastserve_ray.engine.detokenizer import REPLACEMENT_CHAR
from fastserve_ray.engine.engine_config import resolve_cache_sizes
from fastserve_ray.engine.llm_engine import profile_lengths, resolve_dtype
from fastserve_ray.errors import ConfigError

VOCAB = 512  # the tiny presets'
MAX_LEN = 256


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(salt * 97 + 13 * j + 1) % VOCAB for j in range(n)]


def _assert_all_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.end_step()
    assert not engine.has_unfinished() and not engine.scheduler.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_free_host_blocks == bm.num_host_blocks


# -- validation ---------------------------------------------------------------------------------

BAD_PARAMS = [  # (params, the parameter blamed, how the message shows the bad value)
    ({"max_tokens": 0}, "max_tokens", "got 0"),
    ({"max_tokens": True}, "max_tokens", "got True"),
    ({"max_tokens": 2.5}, "max_tokens", "got 2.5"),
    ({"temperature": -0.1}, "temperature", "got -0.1"),
    ({"temperature": 2.5}, "temperature", "got 2.5"),
    ({"temperature": float("nan")}, "temperature", "got nan"),
    ({"temperature": "hot"}, "temperature", "got 'hot'"),
    ({"top_p": 0}, "top_p", "got 0"),
    ({"top_p": 1.5}, "top_p", "got 1.5"),
    ({"top_k": -2}, "top_k", "got -2"),
    ({"top_k": 1.5}, "top_k", "got 1.5"),
    ({"seed": -1}, "seed", "got -1"),
    ({"seed": 2**64}, "seed", f"got {2**64}"),
    ({"stop": 5}, "stop", "got 5"),
    ({"stop": [""]}, "stop", "got ''"),
    ({"stop": ["ok", 3]}, "stop", "got 3"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "-1"),
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids", f"{VOCAB} is outside the vocabulary [0, {VOCAB})"),
    ({"stop_token_ids": 7}, "stop_token_ids", "got 7"),
    ({"ignore_eos": "yes"}, "ignore_eos", "got 'yes'"),
    ({"logprobs": -1}, "logprobs", "got -1"),
    ({"logprobs": 21}, "logprobs", "got 21"),
    ({"bogus": 1}, "bogus", "'bogus'"),
]


@pytest.mark.parametrize(("params", "param", "fragment"), BAD_PARAMS)
def test_bad_sampling_params_are_rejected_naming_the_parameter(params, param, fragment):
    engine = make_engine(tiny_model("tiny"))
    with pytest.raises(RequestError) as e:
        engine.add_request([1, 2, 3], params)
    assert e.value.param == param and param in str(e.value) and fragment in str(e.value)
    _assert_all_free(engine)


@pytest.mark.parametrize(("prompt", "params", "param", "fragment"), [
    ([], None, "prompt", "at least one token"),
    ([1, VOCAB], None, "prompt", f"{VOCAB!r} at position 1"),
    ([1, -3], None, "prompt", "-3"),
    ([1, "a"], None, "prompt", "'a'"),
    (3.5, None, "prompt", "float"),
    (_prompt(MAX_LEN), None, "prompt", f"max_model_len={MAX_LEN}"),
    (_prompt(10), {"max_tokens": MAX_LEN}, "max_tokens", f"max_tokens ({MAX_LEN})"),
    ("text", None, "prompt", "no tokenizer"),
    ([1], 42, "params", "int"),
])
def test_bad_prompts_are_rejected_naming_the_parameter(prompt, params, param, fragment):
    engine = make_engine(tiny_model("tiny"))
    with pytest.raises(RequestError) as e:
        engine.add_request(prompt, params)
    assert e.value.param == param and fragment in str(e.value)
    _assert_all_free(engine)


def test_request_ids_and_kv_capacity_are_validated():
    engine = make_engine(tiny_model("tiny"), num_blocks=4, block_size=8)  # 32 tokens of KV
    with pytest.raises(RequestError) as e:
        engine.add_request(_prompt(20), {"max_tokens": 20})
    assert e.value.param == "max_tokens" and "KV cache capacity of 32 tokens" in str(e.value)
    engine.add_request(_prompt(4), {"max_tokens": 4}, request_id="a")
    for bad, fragment in (("a", "already running"), ("", "non-empty"), (5, "non-empty")):
        with pytest.raises(RequestError) as e:
            engine.add_request(_prompt(4), None, request_id=bad)
        assert e.value.param == "request_id" and fragment in str(e.value)
    assert engine.num_unfinished == 1
    engine.abort("a")
    _assert_all_free(engine)


def test_engine_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="policy"):
        EngineConfig(policy="lifo")
    with pytest.raises(ConfigError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ConfigError, match="unknown key"):
        EngineConfig.from_dict({"blocksize": 16})
    with pytest.raises(ConfigError, match="max_model_len=512 exceeds"):
        make_engine(tiny_model("tiny"), max_model_len=512)
    with pytest.raises(ConfigError, match="holds no block"):
        make_engine(tiny_model("tiny"), num_blocks=None, kv_cache_memory_bytes=100)


def test_cache_sizes_follow_the_memory_budget_and_preemption_mode():
    model = tiny_model("tiny")
    per_block = model.cache_bytes_per_block(8, torch.float32)
    engine = make_engine(model, num_blocks=None, kv_cache_memory_bytes=10 * per_block + 5)
    assert engine.block_manager.num_blocks == 10 and engine.runner.cache.shape[2] == 80
    assert engine.block_manager.num_host_blocks == 0  # fcfs recomputes: no host tier
    # mlfq swaps: a host tier for a full batch of full-length sequences (8 of MAX_LEN tokens),
    # more than the 6-block device holds, so swapped-out sequences can pile up without any of
    # them being dropped for recompute.
    swapping = make_engine(model, policy="mlfq", num_blocks=6, prefill_time={1: 1.0})
    assert swapping.block_manager.num_host_blocks == 8 * MAX_LEN // 8
    assert not swapping.runner.host_cache.is_pinned()  # pinned only for a GPU device
    default = make_engine(model, num_blocks=None, max_num_seqs=3)
    assert default.block_manager.num_blocks == 3 * MAX_LEN // 8  # a full batch, full length


def test_the_host_tier_is_capped_by_the_swap_budget_and_never_smaller_than_the_device():
    config = EngineConfig(num_blocks=100, max_num_seqs=2, block_size=16, preemption_mode="swap")
    sizes = dict(is_recurrent=False, max_model_len=64, preemption_mode="swap", device=torch.device("cpu"))
    # A full batch is 2 * 4 = 8 blocks, fewer than the device's 100: the tier matches the device.
    assert resolve_cache_sizes(config, bytes_per_block=1024, **sizes).num_host_blocks == 100
    # Blocks of 1 GiB: the 4 GiB swap budget holds 4 of them.
    assert resolve_cache_sizes(config, bytes_per_block=1 << 30, **sizes).num_host_blocks == 4
    assert resolve_cache_sizes(config, bytes_per_block=1024, **{**sizes, "preemption_mode": "recompute"}
                               ).num_host_blocks == 0


# -- stops and text -----------------------------------------------------------------------------

def _stream(engine: LLMEngine, prompt, params) -> list:
    request_id = engine.add_request(prompt, params)
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def _check_stream(outputs: list) -> None:
    """Each output extends the previous one by exactly its deltas."""
    text, tokens = "", []
    for out in outputs:
        text += out.delta_text
        tokens += out.new_token_ids
        assert out.text == text and out.token_ids == tokens
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])


def test_multibyte_output_streams_whole_characters(tiny_tokenizer):
    text = "héllo wörld ✓ 日本語 🙂"
    engine, prompt = scripted_engine(tiny_tokenizer, text)
    outputs = _stream(engine, prompt, SamplingParams(max_tokens=64, temperature=0))
    _check_stream(outputs)
    assert all(REPLACEMENT_CHAR not in o.delta_text for o in outputs)
    assert any(o.new_token_ids and not o.delta_text for o in outputs)  # something was held
    final = outputs[-1]
    assert final.text == text and final.finish_reason == "stop"  # the script ends with EOS
    assert final.token_ids == tiny_tokenizer.encode(text) + [tiny_tokenizer.eos_id]


@pytest.mark.parametrize(("stops", "expected"), [
    (["STOP"], "A STOwAY, then "),
    (["then", "STOP"], "A STOwAY, "),  # the earliest match wins
    (["AY,"], "A STOw"),
    (["nowhere"], "A STOwAY, then STOP here"),
])
def test_stop_strings_cut_the_text_and_never_leak_into_deltas(tiny_tokenizer, stops, expected):
    full = "A STOwAY, then STOP here"
    engine, prompt = scripted_engine(tiny_tokenizer, full)
    outputs = _stream(engine, prompt, SamplingParams(max_tokens=64, temperature=0, stop=stops))
    _check_stream(outputs)
    final = outputs[-1]
    assert final.text == expected and final.finish_reason == "stop"
    for out in outputs:
        assert expected.startswith(out.text)  # nothing handed out is ever taken back
    if expected != full:
        assert len(final.token_ids) < len(tiny_tokenizer.encode(full))  # stopped early
    _assert_all_free(engine)


def test_stop_token_ids_eos_and_length(tiny_tokenizer):
    text = "abc def ghi"
    script = tiny_tokenizer.encode(text)
    eos = tiny_tokenizer.eos_id
    engine, prompt = scripted_engine(tiny_tokenizer, text)
    stop_id = script[2]
    out = engine.generate(prompt, SamplingParams(max_tokens=50, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == script[:3]
    assert out.text == tiny_tokenizer.decode(script[:2])  # the stop token's text is left out
    out = engine.generate(prompt, SamplingParams(max_tokens=50))[0]
    assert out.finish_reason == "stop" and out.token_ids == [*script, eos] and out.text == text
    out = engine.generate(prompt, SamplingParams(max_tokens=len(script) + 3, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.token_ids == [*script, eos, eos, eos]
    out = engine.generate(prompt, SamplingParams(max_tokens=2))[0]
    assert out.finish_reason == "length" and out.text == tiny_tokenizer.decode(script[:2])
    _assert_all_free(engine)


def test_eos_of_a_random_model_stops_greedy_decoding():
    model = tiny_model("tiny")
    prompt = _prompt(9)
    free_run = reference_greedy(model, prompt, 12)
    eos = free_run[5]
    engine = LLMEngine(model, None, EngineConfig(num_blocks=64, block_size=8), eos_token_id=eos)
    out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    first = free_run.index(eos)
    assert out.token_ids == free_run[: first + 1] and out.finish_reason == "stop"


def test_logprobs_match_the_full_forward():
    model = tiny_model("tiny")
    engine = make_engine(model, max_num_batched_tokens=8)
    prompt = _prompt(11, salt=3)
    mine = SamplingParams(max_tokens=8, temperature=1.0, seed=3, logprobs=3)
    out, other = engine.generate([prompt, _prompt(5)], [mine, SamplingParams(max_tokens=4)])
    assert other.logprobs is None
    assert len(out.logprobs) == len(out.token_ids) == 8
    for k, lp in enumerate(out.logprobs):
        ref = reference_logprobs(model, prompt + out.token_ids[:k])
        assert lp.token_id == out.token_ids[k]
        assert math.isclose(lp.logprob, float(ref[lp.token_id]), abs_tol=1e-4)
        assert [t for t, _ in lp.top_logprobs] == ref.topk(3).indices.tolist()


def test_metrics_are_ordered_timestamps():
    engine = make_engine(tiny_model("tiny"))
    outs = engine.generate([_prompt(30), _prompt(3, 1)], SamplingParams(max_tokens=5))
    for out in outs:
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
        assert m.first_token_time <= m.last_token_time <= m.finish_time
        assert m.time_to_first_token >= 0 and m.job_completion_time >= m.time_to_first_token
        assert out.time_per_output_token >= 0 and out.num_output_tokens == 5


# -- batches, seeds, aborts, accounting ---------------------------------------------------------

def test_generate_returns_outputs_in_prompt_order():
    model = tiny_model("tiny")
    engine = make_engine(model)
    prompts = [_prompt(40), _prompt(2, 1), _prompt(17, 2)]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (9, 2, 5)]
    outs = engine.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [9, 2, 5]
    assert [o.token_ids for o in outs] == [reference_greedy(model, p, s.max_tokens)
                                           for p, s in zip(prompts, params)]
    assert engine.generate(_prompt(4), SamplingParams(max_tokens=3))[0].prompt_token_ids == _prompt(4)
    with pytest.raises(RequestError) as e:
        engine.generate(prompts, params[:2])
    assert e.value.param == "params"
    with pytest.raises(RequestError):  # all or nothing: the valid first prompt is withdrawn
        engine.generate([_prompt(3), []])
    _assert_all_free(engine)


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = tiny_model("tiny")
    prompt = _prompt(12, salt=5)
    me = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=1234,
                        ignore_eos=True)
    alone = make_engine(model).generate([prompt], me)[0].token_ids
    crowd = [_prompt(50, 1), prompt, _prompt(33, 2), _prompt(7, 3), _prompt(41, 4)]
    crowd_params = [
        SamplingParams(max_tokens=12, temperature=1.0),  # unseeded
        me,
        SamplingParams(max_tokens=15, temperature=0.7, seed=9, logprobs=2),
        SamplingParams(max_tokens=20, temperature=0),
        SamplingParams(max_tokens=9, temperature=1.5, top_k=5, seed=1234),  # same seed
    ]
    for config, counter in [
        (dict(policy="mlfq", num_blocks=14, preemption_mode="recompute",
              max_num_batched_tokens=16), "num_preempted"),
        (dict(policy="fcfs", num_blocks=14, preemption_mode="swap", num_host_blocks=40,
              max_num_batched_tokens=8), "num_swapped_out"),
    ]:
        engine = make_engine(model, **config)
        assert engine.generate(crowd, crowd_params)[1].token_ids == alone
        assert getattr(engine.stats, counter) > 0
    reseeded = SamplingParams(**{**me.__dict__, "seed": 4321})
    assert make_engine(model).generate([prompt], reseeded)[0].token_ids != alone


def test_abort_returns_a_final_output_and_frees_blocks():
    model = tiny_model("tiny")
    engine = make_engine(model, num_blocks=20)
    ids = [engine.add_request(_prompt(20, i), SamplingParams(max_tokens=30)) for i in range(3)]
    for _ in range(4):
        engine.step()
    out = engine.abort(ids[1])
    assert out.finished and out.finish_reason == "abort" and out.request_id == ids[1]
    assert engine.abort(ids[1]) is None and engine.abort("nope") is None
    finished = {}
    while engine.has_unfinished():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finished) == {ids[0], ids[2]}
    assert all(o.finish_reason == "length" for o in finished.values())
    _assert_all_free(engine)


def _check_block_conservation(engine: LLMEngine) -> None:
    """Every device block is free or held by a live sequence; the same for host blocks."""
    bm = engine.block_manager
    seqs = list(engine.scheduler.sequences.values())
    held = {b for s in seqs for b in s.block_table}
    assert len(held) + bm.num_free_blocks == bm.num_blocks
    assert sum(len(s.host_block_table) for s in seqs) + bm.num_free_host_blocks == bm.num_host_blocks


@pytest.mark.parametrize("preset", ["tiny", "lstm-tiny"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_block_leaks_after_finishes_aborts_and_preemptions(preset, seed):
    rng = random.Random(seed)
    policy, mode = [("fcfs", "recompute"), ("mlfq", "swap"), ("mlfq", "recompute")][seed]
    num_blocks = 12 if preset == "tiny" else 3
    engine = make_engine(tiny_model(preset), policy=policy, preemption_mode=mode,
                         num_blocks=num_blocks, num_host_blocks=10, max_num_batched_tokens=12,
                         max_num_seqs=6, prefill_time={1: 1.0, 64: 8.0})
    shared = _prompt(16, 99)
    live: list[str] = []
    reasons = []
    for step in range(80):
        if step < 50 and rng.random() < 0.4:
            prompt = (shared if rng.random() < 0.3 else []) + _prompt(rng.randint(1, 30), step)
            params = SamplingParams(max_tokens=rng.randint(1, 20), temperature=rng.choice([0, 1]),
                                    stop_token_ids=[rng.randrange(VOCAB)])
            live.append(engine.add_request(prompt, params))
        if live and rng.random() < 0.15:
            out = engine.abort(live.pop(rng.randrange(len(live))))
            reasons.append(out.finish_reason)
        for out in engine.step():
            if out.finished:
                live.remove(out.request_id)
                reasons.append(out.finish_reason)
        _check_block_conservation(engine)
    while engine.has_unfinished():
        reasons += [o.finish_reason for o in engine.step() if o.finished]
        _check_block_conservation(engine)
    assert "abort" in reasons and "length" in reasons
    if preset == "tiny" or policy == "mlfq":  # FCFS never evicts a fixed-size state slot
        assert engine.stats.num_preempted + engine.stats.num_swapped_out > 0
    _assert_all_free(engine)


# -- start-up -----------------------------------------------------------------------------------

def test_mlfq_profiles_prefill_time_at_start_up():
    engine = make_engine(tiny_model("tiny"), policy="mlfq", num_blocks=64)
    lengths = profile_lengths(MAX_LEN)
    assert lengths == [1, 16, 64, MAX_LEN]
    assert sorted(engine.prefill_time) == lengths  # 64 blocks of 8 hold every length
    assert all(t > 0 for t in engine.prefill_time.values())
    assert engine.scheduler.prefill_time(MAX_LEN) == engine.prefill_time[MAX_LEN]
    given = make_engine(tiny_model("tiny"), policy="mlfq", prefill_time={1: 0.5, 100: 2.0})
    assert given.prefill_time == {1: 0.5, 100: 2.0}
    assert given.scheduler.prefill_time(50) == pytest.approx(0.5 + 1.5 * 49 / 99)


def test_from_model_dir_matches_the_single_prompt_path(tiny_model_dir):
    from fastserve_ray.models import load_model_dir
    from fastserve_ray.models.generate import generate_text

    # fp32 on both sides: "auto" is bf16 on CPUs with native bf16, and the reference is fp32.
    engine = LLMEngine.from_model_dir(tiny_model_dir, device="cpu", max_num_seqs=2, dtype=torch.float32)
    prompts = ["The for", "def f(x):"]
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    loaded = load_model_dir(tiny_model_dir)
    for prompt, out in zip(prompts, outs):
        assert out.text == generate_text(loaded.model, loaded.tokenizer, prompt, max_tokens=10)
    seen = []

    def loader(path, device, dtype):  # the seam compressed model directories will use
        seen.append((path, device, dtype))
        return load_model_dir(path, device=device, dtype=dtype)

    LLMEngine.from_model_dir(tiny_model_dir, device="cpu", loader=loader, max_num_seqs=1, dtype=torch.float32)
    LLMEngine.from_model_dir(tiny_model_dir, device="cpu", loader=loader, max_num_seqs=1)  # auto
    auto = resolve_dtype("auto", torch.device("cpu"))  # this machine's pick
    assert seen == [(tiny_model_dir, torch.device("cpu"), torch.float32),
                    (tiny_model_dir, torch.device("cpu"), auto)]
