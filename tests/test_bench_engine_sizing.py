"""bench engine: the default sizes that keep a run to minutes, and its progress bookkeeping."""

import pytest

from fastserve_ray.bench.engine import (
    OFFLINE_MAX_OUT,
    OFFLINE_REQUESTS,
    ONLINE_REQUESTS,
    Progress,
    expected_sweep_seconds,
    make_trace,
)


def test_default_offline_trace_is_small_but_still_heavy_tailed():
    trace = make_trace(OFFLINE_REQUESTS, 8192, seed=0, max_prompt=512, max_out=OFFLINE_MAX_OUT)
    outs = sorted(r.output_len for r in trace)
    # HF static batching runs each batch to its longest output: the cap bounds its time.
    assert outs[-1] <= 256 and sum(outs) < 2000
    assert outs[len(outs) // 2] < 40 and outs[-1] >= 200  # mostly short, some long


def test_sweep_lower_bound_is_the_arrival_spans():
    # 2 policies x 3 seeds, each run's arrivals span (n - 1) / rate seconds on average.
    assert expected_sweep_seconds(ONLINE_REQUESTS, 2.0, (0.5, 1.0), (0, 1, 2)) == pytest.approx(
        6 * 23 / 1.0 + 6 * 23 / 2.0)


def test_progress_charges_parts(capsys):
    p = Progress()
    p.add("x", 1.5)
    p.add("x", 0.5)
    p.log("hello")
    assert p.parts == {"x": 2.0} and "hello" in capsys.readouterr().out
