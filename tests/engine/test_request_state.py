"""RequestState: a step's output costs O(new tokens), and the history still reads back whole."""

from __future__ import annotations

import tracemalloc

from fastserve_ray.engine.outputs import RequestOutput
from fastserve_ray.engine.request_state import RequestState
from fastserve_ray.engine.sampler import TokenLogprobs
from fastserve_ray.engine.sampling_params import SamplingParams
from fastserve_ray.engine.sequence import Sequence

NUM_TOKENS = 4000


def _state(tokenizer=None, **params) -> RequestState:
    seq = Sequence([1, 2, 3], SamplingParams(**params), arrival_time=0.0)
    return RequestState("r", seq, tokenizer, None)


def _run(state: RequestState, tokens: list[int]) -> list[RequestOutput]:
    outs = []
    for i, tok in enumerate(tokens):
        reason = "length" if i == len(tokens) - 1 else None
        lp = TokenLogprobs(tok, -1.0, ()) if state.params.logprobs is not None else None
        state.on_token(tok, lp, float(i), reason)
        outs.append(state.make_output())
    return outs


def test_keeping_every_step_output_costs_linear_memory():
    # Copying the history into each output (the old make_output) retains ~n^2/2 list slots
    # for token ids and as many again for logprobs: ~128 MB here, against ~2 MB now.
    state = _state(logprobs=0, max_tokens=NUM_TOKENS)
    tokens = [i % 500 for i in range(NUM_TOKENS)]
    tracemalloc.start()
    try:
        outs = _run(state, tokens)
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 8 * 1024 * 1024, f"{retained / 2**20:.1f} MiB retained by {len(outs)} outputs"
    # Each output is a snapshot: its history reads back as of that step.
    assert all(len(o.new_token_ids) == 1 and len(o.new_logprobs) == 1 for o in outs)
    assert outs[9].token_ids == tokens[:10] and outs[9].num_output_tokens == 10
    assert [lp.token_id for lp in outs[9].logprobs] == tokens[:10]
    assert outs[-1].finished and outs[-1].token_ids == tokens
    assert outs[-1].time_per_output_token == 1.0


def test_text_history_is_the_concatenated_deltas(tiny_tokenizer):
    text = "hello world, hello stop-free text " * 20
    tokens = tiny_tokenizer.encode(text)
    outs = _run(_state(tiny_tokenizer, stop=["zzz"], max_tokens=len(tokens)), tokens)
    joined = ""
    for out in outs:
        joined += out.delta_text
        assert out.text == joined  # read back in order ...
    assert outs[-1].text == text
    assert outs[5].text == "".join(o.delta_text for o in outs[:6])  # ... and out of order
    assert len(outs[-2].text) <= len(text) - 2  # "zzz" holds back two characters while running
