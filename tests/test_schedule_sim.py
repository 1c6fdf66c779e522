"""The scheduling simulator: the engine's real schedulers on a simulated clock."""

import pytest

from fastserve_ray.bench.schedule_sim import (
    SimShape,
    StepCost,
    simulate,
    simulate_sweep,
    simulated_capacity,
)
from fastserve_ray.bench.trace import TraceRequest, make_trace

ROOMY = SimShape(num_blocks=64, num_host_blocks=64, max_num_seqs=8)


def test_one_request_takes_its_prefill_step_then_one_step_per_token():
    # Prefill of 10 tokens: 1 + 10 * 0.1 = 2 s, which samples the first token; two decodes of
    # 1 + 0.5 s each follow.
    cost = StepCost(base_s=1.0, per_decode_s=0.5, per_prefill_token_s=0.1)
    r = simulate("fcfs", [TraceRequest(list(range(3, 13)), 3)], ROOMY, cost)
    assert r["ttft_mean"] == pytest.approx(2.0) and r["jct_mean"] == pytest.approx(5.0)
    assert r["end_s"] == pytest.approx(5.0) and r["recomputed"] == 0


def test_srpt_oracle_finishes_the_short_request_first_where_fcfs_cannot():
    long, short = TraceRequest(list(range(3, 11)), 20), TraceRequest(list(range(20, 28)), 2)
    one_at_a_time = SimShape(num_blocks=64, num_host_blocks=64, max_num_seqs=1)
    cost = StepCost(1.0, 0.0, 0.0)
    # One slot: fcfs runs the first arrival to the end (21 steps incl. its prefill) first.
    fcfs = simulate("fcfs", [long, short], one_at_a_time, cost)
    oracle = simulate("srpt-oracle", [long, short], one_at_a_time, cost)
    assert fcfs["jct_mean"] == pytest.approx((20 + 22) / 2)
    assert oracle["jct_mean"] == pytest.approx((2 + 22) / 2)


def test_calibration_fits_the_measured_steps_and_profile():
    cost = StepCost.calibrate({1: 0.010, 65: 0.026}, {1: 0.0102, 101: 0.0302, 201: 0.0502})
    assert cost.per_decode_s == pytest.approx(0.00025) and cost.base_s == pytest.approx(0.00975)
    assert cost.per_prefill_token_s == pytest.approx(0.0002)
    assert cost.prefill_table()[1024] == pytest.approx(cost.base_s + 1024 * 0.0002)


def test_a_sweep_is_deterministic_and_reports_every_policy_against_fcfs():
    base = make_trace(24, 4096, seed=1, max_prompt=128, max_out=128)
    shape = SimShape(num_blocks=24, num_host_blocks=96, max_num_seqs=16)
    cost = StepCost(0.0075, 0.00025, 0.00022)
    a = simulate_sweep(base, 20.0, range(3), shape, cost)
    assert a == simulate_sweep(base, 20.0, range(3), shape, cost)
    assert set(a) == {"fcfs", "mlfq", "fcfs-swap", "srpt-oracle"}
    assert a["fcfs"]["jct_gain_captured"] == 0 and a["fcfs"]["jct_p99_vs_fcfs"] == 1
    # Memory for 3 of these sequences against 20 req/s: fcfs queues; knowing the lengths helps.
    assert a["fcfs"]["ttft_mean"] > 2 * a["srpt-oracle"]["ttft_mean"]
    assert a["srpt-oracle"]["jct_mean"] < a["fcfs"]["jct_mean"]
    assert a["fcfs"]["recomputed"] > 0 and a["fcfs-swap"]["recomputed"] == 0


def test_capacity_scales_inversely_with_the_step_cost():
    base = make_trace(12, 4096, seed=2, max_prompt=64, max_out=32)
    cost = StepCost(0.01, 0.001, 0.0001)
    # Standing queue, one request at a time: each takes its prefill step then a step per token.
    one = SimShape(num_blocks=64, num_host_blocks=0, max_num_seqs=1)
    capacity = simulated_capacity(base, one, cost)
    prefill = [0.01 + 0.0001 * len(r.prompt) for r in base + base]
    per_request = [p + (r.output_len - 1) * 0.011 for p, r in zip(prefill, base + base)]
    # 24 queued (the trace twice): the clock stops when the last one leaves the queue, i.e.
    # after 23 whole requests and the 24th's prefill step.
    assert capacity == pytest.approx(23 / (sum(per_request[:23]) + prefill[23]))
    assert simulated_capacity(base, one, cost.scaled(2.0)) == pytest.approx(capacity / 2)
