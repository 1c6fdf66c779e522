"""bench engine: the default sizes that keep a run to minutes, and its progress bookkeeping."""

import pytest

from fastserve_ray.bench.engine import OFFLINE_MAX_OUT, OFFLINE_REQUESTS
from fastserve_ray.bench.online_sweep import SCENARIOS, OnlineScenario, expected_sweep_seconds, knee_load
from fastserve_ray.bench.report import Progress
from fastserve_ray.bench.trace import make_trace


def test_default_offline_trace_is_small_but_still_heavy_tailed():
    trace = make_trace(OFFLINE_REQUESTS, 8192, seed=0, max_prompt=512, max_out=OFFLINE_MAX_OUT)
    outs = sorted(r.output_len for r in trace)
    # HF static batching runs each batch to its longest output: the cap bounds its time.
    assert outs[-1] <= 256 and sum(outs) < 2000
    assert outs[len(outs) // 2] < 40 and outs[-1] >= 200  # mostly short, some long


def test_sweep_lower_bound_is_the_arrival_spans():
    # 2 policies x 3 seeds, each run's arrivals span (n - 1) / rate seconds on average.
    assert expected_sweep_seconds(48, 2.0, (0.5, 1.0), (0, 1, 2)) == pytest.approx(
        6 * 47 / 1.0 + 6 * 47 / 2.0)
    assert expected_sweep_seconds(48, 2.0, (1.0,), (0,), ("fcfs", "mlfq", "fcfs-swap")) == pytest.approx(
        3 * 47 / 2.0)


def test_scenarios_cover_the_issue_loads_and_size_the_kv_cache_in_full_sequences():
    kv, overload, slots = SCENARIOS
    assert kv.name == "kv-bound" and min(kv.loads) <= 0.5 and max(kv.loads) >= 1.2
    # FastServe's setting: the same memory, twice the requests, arriving above capacity; its
    # capacity is kv-bound's (same engine shape), and fcfs-swap runs where memory is scarce.
    assert overload.requests == 2 * kv.requests and min(overload.loads) > 1.2
    assert overload.engine_kw(1024) == kv.engine_kw(1024) and overload.capacity_of == "kv-bound"
    assert kv.policies == overload.policies == ("fcfs", "mlfq", "fcfs-swap")
    assert slots.policies == ("fcfs", "mlfq")
    assert overload.quick().loads == (0.8,) and kv.quick().loads == (0.8, 1.2)
    # 3 sequences of 512 tokens in 16-token blocks; the batch itself could hold 32.
    assert kv.engine_kw(512)["num_blocks"] == 96 and kv.engine_kw(512)["max_num_seqs"] == 32
    assert kv.engine_kw(500)["num_blocks"] == 96  # a partial block still takes a whole block
    assert "num_blocks" not in slots.engine_kw(512)  # the engine's default budget
    quick = kv.quick()
    assert quick.requests < kv.requests and quick.kv_full_sequences == 3
    assert OnlineScenario("x", "", 4, 10, (1.0,)).engine_kw(64)["max_num_batched_tokens"] == 512


def _by_load(ttfts: dict[float, float]) -> dict[float, dict[str, float]]:
    return {x: {"ttft_mean_fcfs": t} for x, t in ttfts.items()}


def test_the_knee_is_where_fcfs_starts_to_queue():
    # 0.1 s at the lightest load; 3x that (0.3 s) first at load 1.5.
    assert knee_load(_by_load({0.5: 0.1, 1.0: 0.2, 1.5: 0.55, 2.0: 1.0})) == 1.5
    assert knee_load(_by_load({0.5: 0.1, 1.0: 0.31, 1.5: 0.55})) == 1.0
    assert knee_load(_by_load({0.5: 0.1, 1.0: 0.12, 1.2: 0.15})) == 1.2  # no queue: the highest


def test_progress_charges_parts(capsys):
    p = Progress()
    p.add("x", 1.5)
    p.add("x", 0.5)
    p.log("hello")
    assert p.parts == {"x": 2.0} and "hello" in capsys.readouterr().out
