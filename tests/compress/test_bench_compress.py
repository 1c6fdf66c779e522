"""`fastserve-ray bench compress --quick`: the whole benchmark end to end on tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import ray

from fastserve_ray.bench.compress import run_compress_bench

KEYS = {"int8_weight_ratio", "int8_ppl_ratio", "int8_decode_speedup_b1", "int4_rtn_ppl", "int4_gptq_ppl",
        "int4_gptq_weight_ratio", "magnitude50_ppl", "wanda50_ppl", "sparse24_int4_weight_ratio", "graph_s",
        "serial_s", "max_concurrent_tasks"}


def test_quick_bench_writes_json_table_and_plot(tmp_path: Path, capsys) -> None:
    out = tmp_path / "compress.json"
    try:
        run_compress_bench(out, quick=True, work_dir=tmp_path / "work")
    finally:
        ray.shutdown()
    report = json.loads(out.read_text())
    assert set(report) >= KEYS
    assert 3.5 < report["int8_weight_ratio"] < 4.1
    assert report["int4_gptq_weight_ratio"] > 6.5
    assert 0.9 < report["int8_ppl_ratio"] < 1.1
    assert report["int8_decode_speedup_b1"] > 0 and report["graph_s"] > 0 and report["serial_s"] > 0
    assert report["max_concurrent_tasks"] >= 2  # per-layer tasks did overlap (Ray's state API)
    assert out.with_suffix(".png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "int4-gptq-g64" in printed and "graph" in printed
    # The trained model is cached: the work dir records it for the next run.
    assert (tmp_path / "work" / "model_dir.txt").is_file()
