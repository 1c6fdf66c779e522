"""engine.compile: the compiled decode step gives the eager engine's greedy tokens; validation.

Compiling is slow (tens of seconds even for the tiny preset on a small CPU), so one engine with
a single bucket serves the equivalence check.
"""

from __future__ import annotations

import pytest
from model_helpers import make_engine, reference_greedy, tiny_model

from fastserve_ray.engine import EngineConfig, SamplingParams, compiled_decode
from fastserve_ray.engine.compiled_decode import batch_buckets, bucket_for
from fastserve_ray.errors import ConfigError


def _prompt(n: int, salt: int) -> list[int]:
    return [(salt * 97 + 13 * j + 1) % 512 for j in range(n)]


def test_compile_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"engine\.compile must be true or false, got 'yes'"):
        EngineConfig(compile="yes")
    with pytest.raises(ConfigError, match="engine.compile"):
        EngineConfig.from_dict({"compile": 1})
    assert EngineConfig().compile is False and EngineConfig(compile=True).compile is True


def test_buckets():
    assert batch_buckets(1) == (1,) and batch_buckets(3) == (1, 2, 4)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert [bucket_for(b, (1, 2, 4)) for b in (1, 2, 3, 4)] == [1, 2, 4, 4]


def test_compiled_decode_equals_eager_greedy(monkeypatch):
    model = tiny_model("tiny")
    # One bucket of 4 (one compile keeps the test short): every decode batch of 1 to 3 is
    # padded with dummy rows. Three prompts through three slots of different lengths give
    # contexts that cross block boundaries, and prefill chunks that mix with decodes (eager)
    # between compiled decode-only steps.
    monkeypatch.setattr(compiled_decode, "batch_buckets", lambda max_num_seqs: (4,))
    prompts = [_prompt(n, salt) for salt, n in enumerate((5, 19, 11))]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (24, 9, 16)]
    eager = make_engine(model, max_num_seqs=3, max_num_batched_tokens=16).generate(prompts, params)
    engine = make_engine(model, max_num_seqs=3, max_num_batched_tokens=16, compile=True)
    assert engine.runner.compiled is not None and engine.runner.compile_seconds > 0
    batches = []
    run = engine.runner.compiled.run

    def counted(input_ids, ctx):
        batches.append(len(ctx.host_query_lens))
        return run(input_ids, ctx)

    engine.runner.compiled.run = counted
    compiled = engine.generate(prompts, params)
    assert {1, 3} <= set(batches)  # decode-only steps of several sizes took the compiled path
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert compiled[0].token_ids == reference_greedy(model, prompts[0], 24)
    bm = engine.block_manager
    bm.end_step()
    assert bm.num_free_blocks == bm.num_blocks


def test_a_failing_compile_falls_back_to_eager(monkeypatch, caplog):
    def broken(self, max_width):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled_decode.CompiledDecode, "warm_up", broken)
    model = tiny_model("tiny")
    prompt = _prompt(7, 0)
    engine = make_engine(model, max_num_seqs=2, compile=True)
    assert engine.runner.compiled is None and "no C++ compiler" in caplog.text
    out = engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == reference_greedy(model, prompt, 6)
