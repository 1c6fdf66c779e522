"""`fastserve-ray bench engine --quick`: the whole benchmark end to end on the tiny preset."""

import json

import pytest

from fastserve_ray.bench.engine import resimulate, run_engine_bench
from fastserve_ray.bench.online_sweep import SCENARIOS

KEYS = ("engine_tok_s", "hf_sequential_tok_s", "hf_static_batch_tok_s", "roofline_tok_s",
        "step_roofline_ratio_b64", "step_roofline_ratio_b1", "mbu_b1", "jct_mean_fcfs",
        "jct_mean_mlfq", "jct_p99_fcfs", "jct_p99_mlfq", "jct_gain_captured", "dtype")


def test_quick_bench_writes_every_key_both_scenarios_and_the_plot(tmp_path):
    out = tmp_path / "not-yet" / "engine.json"  # the folder does not exist yet
    report = run_engine_bench(out, quick=True, device="cpu")
    assert report["config"]["device"] == "cpu" and list(report["details"]["decode_step_ms"]) == ["64", "1"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert all(k in report for k in KEYS) and report["engine_tok_s"] > 0
    online = report["details"]["online"]
    assert list(online) == [s.name for s in SCENARIOS]
    assert report["details"]["online_headline_scenario"] == "kv-bound"
    kv = online["kv-bound"]
    assert kv["num_blocks"] is not None and online["slot-bound"]["num_blocks"] is None
    # Every (load, seed) ran every policy of its scenario; the headline keys are the kv-bound
    # knee's medians; the overload scenario reused kv-bound's capacity.
    assert len(kv["runs"]) == len(kv["loads"]) * 3
    assert all(set(kv["policies"]) <= set(run) for run in kv["runs"])
    knee = kv["by_load"][str(kv["saturation_load"])]
    assert report["jct_mean_mlfq"] == knee["jct_mean_mlfq"] and "jct_mean_fcfs-swap" in knee
    assert "jct_gain_captured_vs_fcfs_swap" in knee
    assert "fcfs-swap" not in online["slot-bound"]["runs"][0]
    assert online["overload"]["capacity_req_s"] == kv["capacity_req_s"]
    sim = report["details"]["schedule_sim"]
    assert set(sim) == {"seeds", "fitted_cost_model", "kv-bound", "overload"}
    assert set(sim["kv-bound"]["policies"]) == {"fcfs", "mlfq", "fcfs-swap", "srpt-oracle"}
    assert sim["kv-bound"]["load"] == kv["saturation_load"] and sim["fitted_cost_model"]["base_s"] > 0
    # Scaled so that the simulated capacity is the measured one.
    scale, fitted = sim["kv-bound"]["capacity_scale"], sim["fitted_cost_model"]
    assert sim["kv-bound"]["cost_model"]["base_s"] == pytest.approx(scale * fitted["base_s"])
    # --only sim recomputes that part of the written report and keeps the measured figures.
    rewritten = resimulate(out)
    assert rewritten["details"]["schedule_sim"]["recomputed_after_the_run"] is True
    assert rewritten["engine_tok_s"] == report["engine_tok_s"]
    assert json.loads(out.read_text())["details"]["online"] == report["details"]["online"]
    png = out.with_name("engine_jct_vs_load.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.parent.iterdir()) == ["engine.json", "engine_jct_vs_load.png"]


@pytest.mark.gpu
def test_quick_bench_on_cuda_adds_the_batch_256_figure(tmp_path):
    report = run_engine_bench(tmp_path / "engine.json", quick=True, device="cuda")
    assert report["config"]["device"] == "cuda" and report["dtype"] == "bfloat16"
    assert report["details"]["decode_tok_s_by_batch"]["256"] > 0
