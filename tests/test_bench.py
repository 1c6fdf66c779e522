"""The benchmark harnesses on tiny models: traces, the online replay, the plain training loop."""

import time

import numpy as np
import pytest
import torch

from fastserve_ray.bench.online_sweep import measured_capacity, online
from fastserve_ray.bench.trace import make_trace, with_poisson_arrivals
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


def test_capacity_is_counted_while_the_queue_stands(tiny_tokenizer, monkeypatch):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    trace = make_trace(8, 400, seed=2, max_prompt=48, max_out=24)
    engine = LLMEngine(model, tiny_tokenizer, max_num_seqs=2, enable_prefix_caching=False)
    steps_with_queue = []
    step = engine.step

    def counted():
        steps_with_queue.append(engine.load_snapshot()["num_waiting"] > 0)
        return step()

    monkeypatch.setattr(engine, "step", counted)
    capacity = measured_capacity(engine, trace)
    assert capacity > 0 and not engine.has_unfinished()
    # The drain (steps after the queue ran dry) was run but not counted.
    assert steps_with_queue[-1] is False and sum(steps_with_queue) < len(steps_with_queue)


def test_plain_training_loop_measures_throughput(tmp_path, tiny_tokenizer):
    prepare_data(tmp_path / "d", tokenizer_path=tiny_tokenizer.path, seq_len=32, progress=False)
    cfg = TrainConfig(preset="tiny", global_batch_size=8, micro_batch_size=4, max_steps=4, num_workers=1)
    rates = plain_tokens_per_s(tmp_path / "d", cfg, window=2)
    assert len(rates) == 2 and all(r > 0 for r in rates)


def test_engine_roofline_costs_add_up():
    from fastserve_ray.bench.engine import Costs, Probes, TraceRequest

    cfg = get_preset("tiny")
    model = build_model(cfg)
    costs = Costs.of(model, cfg, torch.float32)
    assert costs.kv_bytes_per_token == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    probes = Probes(gemm_fp32=1e9, gemm_bf16=2e9, copy=2e9, read=1e9)
    one = costs.step_seconds([100], probes, torch.float32)
    flops = 2 * costs.matmul_params + costs.attn_flops_per_key * 100
    assert one == (flops / 1e9) + (costs.weight_bytes + costs.kv_bytes_per_token * 100) / 1e9
    assert costs.step_seconds([100] * 4, probes, torch.bfloat16) < 4 * one  # weights read once
    # A trace's floor: batching shares the weight reads, so it beats running them one by one.
    trace = [TraceRequest([1] * 10, 5), TraceRequest([1] * 20, 3)]
    batched = costs.trace_seconds(trace, 64, probes, torch.float32)
    alone = costs.trace_seconds(trace, 1, probes, torch.float32)
    assert 0 < batched < alone


def test_engine_load_sweep_summary_takes_medians_over_seeds():
    from fastserve_ray.bench.online_sweep import summarize_sweep

    def point(load, seed, f, m):
        stats = lambda x: {"jct_mean": x, "jct_p99": 2 * x, "ttft_mean": x / 10, "ttft_p99": x / 5}  # noqa: E731
        return {"load": load, "seed": seed, "fcfs": stats(f), "mlfq": stats(m)}

    points = [point(1.0, s, f, m) for s, (f, m) in enumerate([(4, 1), (6, 3), (5, 2)])]
    points.append(point(0.5, 0, 1, 1))
    by_load = summarize_sweep(points)
    assert sorted(by_load) == [0.5, 1.0]
    assert by_load[1.0]["jct_mean_fcfs"] == 5 and by_load[1.0]["jct_mean_mlfq"] == 2
    assert by_load[1.0]["jct_p99_mlfq"] == 4


def test_jct_vs_load_plot_is_written_atomically(tmp_path):
    from fastserve_ray.bench.online_sweep import plot_jct_vs_load

    stats = {"jct_mean": 1.0, "jct_p99": 2.0, "ttft_mean": 0.1, "ttft_p99": 0.2}
    points = [{"load": x, "seed": s, "fcfs": stats, "mlfq": stats} for x in (0.5, 1.0) for s in (0, 1)]
    out = tmp_path / "jct.png"
    plot_jct_vs_load({"kv-bound": points, "slot-bound": points[:2]}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["jct.png"]  # no temporary file left behind


def test_run_stats_split_short_requests_and_the_no_wait_bound():
    from fastserve_ray.bench.online_sweep import run_stats, summarize_sweep

    r = {"jct": [1.0, 3.0, 10.0], "ttft": [0.5, 0.5, 0.5], "output_len": [8, 20, 400]}
    stats = run_stats(r, short_len=20)
    assert stats["jct_mean_short"] == 2.0 and stats["jct_mean"] == pytest.approx(14 / 3)
    assert stats["ttft_mean"] == 0.5
    # fcfs waits 1 s of its 4 s mean JCT: removing every wait could cut it by 4/3 at most.
    fcfs = {"jct_mean": 4.0, "jct_p99": 9.0, "ttft_mean": 1.0, "ttft_p99": 2.0, "jct_mean_short": 2.0}
    mlfq = dict(fcfs, jct_mean=3.5, jct_mean_short=1.0)
    row = summarize_sweep([{"load": 1.0, "seed": 0, "fcfs": fcfs, "mlfq": mlfq}])[1.0]
    assert row["jct_mean_ratio_bound"] == pytest.approx(4 / 3)
    # 4/3.5 of a possible 4/3: (8/7 - 1) / (4/3 - 1) = 3/7 of the gain captured.
    assert row["jct_gain_captured"] == pytest.approx(3 / 7)
    no_wait = dict(fcfs, ttft_mean=0.0)
    assert summarize_sweep([{"load": 1.0, "seed": 0, "fcfs": no_wait, "mlfq": mlfq}])[1.0][
        "jct_gain_captured"] is None
    assert row["jct_mean_short_fcfs"] == 2.0 and row["jct_mean_short_mlfq"] == 1.0
