"""The compression task graph on a real local Ray: artifact, eval, retries after a killed worker, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from fastserve_ray.cli import main
from fastserve_ray.compress.graph import run_graph
from fastserve_ray.compress.pipeline import CompressOptions, row_chunks
from fastserve_ray.compress.recipe import load_recipe
from fastserve_ray.compress.serial import run_serial
from fastserve_ray.quantized.artifact import read_compressed_tensors
from fastserve_ray.quantized.qtensor import QuantizedWeight

SMALL = dict(num_calibration_rows=8, num_validation_rows=4, seq_len=32)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _file_hashes(out: Path) -> dict[str, str]:
    files = json.loads((out / "manifest.json").read_text())["files"]
    return {name: meta["sha256"] for name, meta in files.items()}


def test_gptq_graph_survives_a_killed_task_with_identical_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = load_recipe("2of4-int4-gptq")  # Wanda 2:4 + GPTQ: calibration chained block by block
    clean = run_graph(tiny_model_dir, tmp_path / "clean", recipe, options=CompressOptions(**SMALL))
    marker = tmp_path / "killed.pid"
    opts = CompressOptions(**SMALL, fault=("layers.1.mlp.down_proj.weight", str(marker)))
    retried = run_graph(tiny_model_dir, tmp_path / "retried", recipe, options=opts)
    assert marker.exists(), "the fault hook never fired"
    assert _file_hashes(clean.out_dir) == _file_hashes(retried.out_dir)

    tensors, compression = read_compressed_tensors(retried.out_dir)
    down = tensors["layers.1.mlp.down_proj.weight"]
    assert isinstance(down, QuantizedWeight) and down.bits == 4 and down.group_size == 64
    groups = (down.q != 0).reshape(down.q.shape[0], -1, 4).sum(-1)
    assert int(groups.max()) <= 2  # 2:4 survives GPTQ
    assert compression["tensors"]["layers.1.mlp.down_proj.weight"]["sparsity"] == "2:4"
    ev = compression["eval"]
    assert ev["before"]["num_tokens"] == 4 * 32 and ev["after"]["perplexity"] > 0
    report = json.loads((retried.out_dir / "report.json").read_text())
    assert report["linear_weight_ratio"] > 8.0  # 2:4 + int4 + zstd


def test_cli_validates_before_work_and_compresses(tmp_path: Path, tiny_model_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: W4A16}\n")
    out = tmp_path / "cli-out"
    # W4A16 = group 128, which does not divide the tiny model's width 64.
    assert main(["compress", "--model", str(tiny_model_dir), "--recipe", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "group_size=128" in err and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["compress", "--model", str(tiny_model_dir), "--recipe", "magnitude50", "--out", str(out)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["compress", "--model", str(tiny_model_dir), "--recipe", "magnitude50", "--out", str(out),
                 "--overwrite"]) == 0
    tensors, compression = read_compressed_tensors(out)
    w = tensors["layers.0.mlp.up_proj.weight"]
    assert not isinstance(w, QuantizedWeight) and float((w == 0).float().mean()) == pytest.approx(0.5)
    assert compression["recipe"]["name"] == "magnitude50"
    assert not (out / "keep.txt").exists()
    report = json.loads((out / "report.json").read_text())
    ev = report["eval"]
    assert ev["perplexity_ratio"] == pytest.approx(ev["after"]["perplexity"] / ev["before"]["perplexity"])
    assert ev["after"]["loss"] != ev["before"]["loss"]  # evaluated on the pruned weights

    # The same stages serially in this process: magnitude pruning has no order-dependent
    # reductions, so the weights are byte-identical to the graph's.
    serial = run_serial(tiny_model_dir, tmp_path / "serial", load_recipe("magnitude50"),
                        options=CompressOptions(**SMALL), quiet=True)
    serial_hashes = _file_hashes(serial.out_dir)
    assert serial_hashes["compressed.safetensors"] == _file_hashes(out)["compressed.safetensors"]


def test_row_chunks_cover_the_rows_on_batch_edges() -> None:
    assert row_chunks(64, 4) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert row_chunks(21, 4) == [(0, 8), (8, 16), (16, 21)]  # never more chunks than batches
    assert row_chunks(8, 4) == [(0, 8)]
    assert row_chunks(40, 2) == [(0, 24), (24, 40)]  # 5 batches: 3 + 2
    assert row_chunks(5, 1) == [(0, 5)]


def test_calibration_split_in_row_chunks_prunes_like_one_pass(tmp_path: Path, tiny_model_dir: Path) -> None:
    # 24 calibration rows = 3 forward batches, one task per batch-sized chunk per block: the
    # chunks' statistics add up to one pass's, so Wanda keeps the same weights as the serial run,
    # and the chunked evaluation counts every validation token once.
    opts = dict(num_calibration_rows=24, num_validation_rows=12, seq_len=32)
    recipe = load_recipe("wanda50")
    chunked = run_graph(tiny_model_dir, tmp_path / "graph", recipe,
                        options=CompressOptions(**opts, row_chunks=3))
    serial = run_serial(tiny_model_dir, tmp_path / "serial", recipe, options=CompressOptions(**opts),
                        quiet=True)
    assert (_file_hashes(chunked.out_dir)["compressed.safetensors"]
            == _file_hashes(serial.out_dir)["compressed.safetensors"])
    ev, ev_serial = chunked.report["eval"], serial.report["eval"]
    assert ev["after"]["num_tokens"] == ev_serial["after"]["num_tokens"] == 12 * 32
    assert ev["after"]["perplexity"] == pytest.approx(ev_serial["after"]["perplexity"], rel=1e-5)


def test_the_executor_runs_independent_tasks_at_once(tmp_path: Path) -> None:
    """Two tasks that each wait for the other to start: they finish only if Ray ran them together
    (one CPU each on a 4-CPU Ray), which is what lets a recipe's per-layer tasks overlap. The
    bench's measured concurrency depends on task length; this does not."""
    from fastserve_ray.compress.graph import RayExecutor

    def _rendezvous(marker_dir: str, me: str, other: str) -> float:  # nested: pickled by value
        """Marks ``me`` as started, then waits for ``other``: returns only if both ran at once."""
        import time

        Path(marker_dir, me).write_text("started")
        deadline = time.monotonic() + 60
        while not Path(marker_dir, other).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {me} ran alone: {other} never started beside it")
            time.sleep(0.01)
        return time.monotonic()

    ex = RayExecutor(max_retries=0)
    a = ex.submit("compress", _rendezvous, str(tmp_path), "a", "b")
    b = ex.submit("compress", _rendezvous, str(tmp_path), "b", "a")
    ex.wait_all()
    assert abs(ex.get(a) - ex.get(b)) < 30 and ex.submitted["compress"] == 2
