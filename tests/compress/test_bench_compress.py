"""`fastserve-ray bench compress --quick`: the whole benchmark end to end on tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import ray

from fastserve_ray.bench.compress import run_compress_bench
from fastserve_ray.bench.compressed_decode import dtype_name
from fastserve_ray.device import resolve_dtype

KEYS = {"int8_weight_ratio", "int8_ppl_ratio", "int8_decode_speedup_b1", "int4_rtn_ppl", "int4_gptq_ppl",
        "int4_gptq_weight_ratio", "magnitude50_ppl", "wanda50_ppl", "sparse24_int4_weight_ratio", "graph_s",
        "serial_s", "max_concurrent_tasks", "int8_decode_speedup_b1_beyond_cache"}


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
    # Decode: interleaved decode-step medians, headline in the engine's default dtype, fp32 and bf16 rows.
    d = report["decode"]
    default = dtype_name(resolve_dtype("auto", "cpu"))
    assert d["default_dtype"] == default
    models = ("uncompressed", "int8", "int4-gptq-g64")
    dtypes = ("float32", "bfloat16")
    assert set(d["step_ms"]) == {f"{m}/{t}/b{b}" for m in models for t in dtypes for b in (1, 32)}
    assert all(v["n"] == 1 and 0 < v["min"] <= v["median"] <= v["max"] for v in d["step_ms"].values())
    ms = d["step_ms"]
    for key, b in (("int8_decode_speedup_b1", 1), ("int8_decode_speedup_b32", 32)):
        base, int8 = ms[f"uncompressed/{default}/b{b}"], ms[f"int8/{default}/b{b}"]
        assert report[key] == base["median"] / int8["median"]
    assert report["int4_decode_speedup_b1"] == d["speedup"][f"int4-gptq-g64/{default}/b1"]
    # The beyond-the-cache comparison: its own models, batch 1, the default dtype only.
    b = report["decode_beyond_cache"]
    assert set(b["step_ms"]) == {f"{m}/{default}/b1" for m in ("uncompressed", "int8")}
    assert report["int8_decode_speedup_b1_beyond_cache"] == (
        b["step_ms"][f"uncompressed/{default}/b1"]["median"] / b["step_ms"][f"int8/{default}/b1"]["median"])
    assert b["linear_params"] > 0 and (tmp_path / "work" / "beyond_cache" / "int8" / "config.json").is_file()
    # Measured from Ray's task events. At these sizes a per-layer task takes ~1 ms, shorter than a
    # second worker's lease, so one worker may run them all (seen on a fast Intel machine): the
    # overlap itself is proven by tests/compress/test_graph.py's rendezvous test, not here.
    assert isinstance(report["max_concurrent_tasks"], int) and report["max_concurrent_tasks"] >= 1
    assert out.with_suffix(".png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "int4-gptq-g64" in printed and "graph" in printed and "bfloat16" in printed
    # The trained model is cached: the work dir records it for the next run.
    assert (tmp_path / "work" / "model_dir.txt").is_file()
