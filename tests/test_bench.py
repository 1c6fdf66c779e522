"""The benchmark harnesses on tiny models: traces, the online replay, the plain training loop."""

import time

import numpy as np
import pytest
import torch

from fastserve_ray.bench.engine import make_trace, online, with_poisson_arrivals
from fastserve_ray.bench.train import plain_tokens_per_s
from fastserve_ray.config import TrainConfig
from fastserve_ray.data import prepare_data
from fastserve_ray.engine import LLMEngine
from fastserve_ray.models import build_model, get_preset


def test_trace_is_seeded_and_within_bounds():
    trace = make_trace(200, vocab_size=512, seed=3)
    assert trace == make_trace(200, vocab_size=512, seed=3)
    assert trace != make_trace(200, vocab_size=512, seed=4)
    assert all(32 <= len(r.prompt) <= 512 and 8 <= r.output_len <= 512 for r in trace)
    assert all(3 <= t < 512 for r in trace for t in r.prompt)  # no special-token ids
    outs = np.array([r.output_len for r in trace])
    assert np.median(outs) < 40 and outs.max() >= 200  # heavy-tailed: mostly short, some long
    timed = with_poisson_arrivals(trace, rate=10.0, seed=0)
    gaps = np.diff([r.arrival for r in timed])
    assert timed[0].arrival == 0.0 and (gaps > 0).all() and 0.05 < gaps.mean() < 0.2


@pytest.mark.parametrize("policy", ["fcfs", "mlfq"])
def test_online_replay_finishes_every_request_with_consistent_times(policy, tiny_tokenizer):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    trace = [r for r in make_trace(12, 400, seed=1, max_prompt=64, max_out=24)]
    trace = with_poisson_arrivals(trace, rate=40.0, seed=0)
    engine = LLMEngine(model, tiny_tokenizer, policy=policy, max_num_seqs=4, clock=time.perf_counter)
    result = online(engine, trace)
    assert len(result["jct"]) == len(result["ttft"]) == 12
    assert all(0 < t <= j for t, j in zip(result["ttft"], result["jct"]))
    assert not engine.has_unfinished()


def test_plain_training_loop_measures_throughput(tmp_path, tiny_tokenizer):
    prepare_data(tmp_path / "d", tokenizer_path=tiny_tokenizer.path, seq_len=32, progress=False)
    cfg = TrainConfig(preset="tiny", global_batch_size=8, micro_batch_size=4, max_steps=4, num_workers=1)
    rates = plain_tokens_per_s(tmp_path / "d", cfg, window=2)
    assert len(rates) == 2 and all(r > 0 for r in rates)
