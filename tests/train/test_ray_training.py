"""Training on a real local Ray cluster: data-parallel equivalence, fault tolerance, resume, elasticity."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import ray
import torch

from fastserve_ray.config import TrainConfig
from fastserve_ray.data import prepare_data
from fastserve_ray.errors import ConfigError, DataError
from fastserve_ray.models import load_model_dir
from fastserve_ray.train.trainer import TrainingError, run_training

ROOT = Path(__file__).resolve().parents[2]
BASE = dict(preset="tiny", global_batch_size=8, max_steps=8, warmup_steps=2, lr=2e-3, min_lr=2e-4,
            log_interval=2, checkpoint_interval=3, eval_interval=4, eval_rows=16, seed=0)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # faster failure detection
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("train") / "data"
    prepare_data(out, tokenizer_path=tiny_tokenizer.path, seq_len=32, rows_per_shard=2000, progress=False)
    return out


def run(data_dir: Path, run_dir: Path, **overrides):
    return run_training(data_dir, run_dir, TrainConfig(**{**BASE, **overrides}))


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_dir(run_dir / "model").model.state_dict()


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


@pytest.fixture(scope="module")
def two_worker_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two")
    return run(data_dir, run_dir, num_workers=2, micro_batch_size=2), run_dir


def test_two_workers_equal_one_worker_with_double_batch(data_dir, tmp_path, two_worker_run):
    result2, dir2 = two_worker_run
    result1 = run(data_dir, tmp_path, num_workers=1, micro_batch_size=8)
    assert result2.metrics["num_workers"] == 2 and result1.metrics["num_workers"] == 1
    diff = max_rel_diff(params(dir2), params(tmp_path))
    print(f"max relative parameter difference, 2 workers vs 1: {diff:.2e}")
    assert diff <= 1e-5
    assert result2.history[-1]["loss"] < result2.history[0]["loss"]  # it learns


def test_outputs_of_a_run(two_worker_run):
    result, run_dir = two_worker_run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 3, 4, 6, 8]
    for key in ("loss", "lr", "tokens_per_s", "mfu", "grad_norm"):
        assert all(key in m for m in lines)
    assert "val_perplexity" in lines[2] and "val_perplexity" in lines[-1]
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_model_dir(run_dir / "model")
    lineage = loaded.manifest["lineage"]
    assert len(lineage["data"]["manifest_sha256"]) == 64
    assert lineage["training"]["config"]["global_batch_size"] == 8
    assert lineage["training"]["final_step"] == 8
    assert result.resumes == []


def test_worker_killed_mid_run_resumes_and_matches(data_dir, tmp_path, two_worker_run):
    result, _ = run(data_dir, tmp_path, num_workers=2, micro_batch_size=2, fail_at_step=5), None
    assert (tmp_path / "checkpoints" / "train" / ".fault_injected").is_file()
    assert len(result.resumes) == 1
    lost = 5 - result.resumes[0]["step"]
    assert 0 <= lost <= BASE["checkpoint_interval"]
    assert result.metrics["step"] == BASE["max_steps"]
    assert max_rel_diff(params(tmp_path), params(two_worker_run[1])) <= 1e-5


def test_torch_compile_option_gives_the_same_losses(data_dir, tmp_path, two_worker_run):
    compiled = run(data_dir, tmp_path, num_workers=1, micro_batch_size=8, compile=True)
    eager = two_worker_run[0]
    assert [m["step"] for m in compiled.history] == [m["step"] for m in eager.history]
    for a, b in zip(compiled.history, eager.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_fsdp_matches_ddp_and_a_killed_worker_resumes(data_dir, tmp_path, two_worker_run):
    """FSDP2 (sharded weights, grads and AdamW state) computes what DDP does, through a worker kill."""
    result = run(data_dir, tmp_path, num_workers=2, micro_batch_size=2, strategy="fsdp", fail_at_step=5)
    assert (tmp_path / "checkpoints" / "train" / ".fault_injected").is_file()
    assert len(result.resumes) == 1 and result.metrics["step"] == BASE["max_steps"]
    # Consolidated checkpoints: the exported model directory has the same files as DDP's.
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(
        p.name for p in (two_worker_run[1] / "model").iterdir())
    assert max_rel_diff(params(tmp_path), params(two_worker_run[1])) <= 1e-5


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite at step \d+.*last good checkpoint \(step \d+\)"):
        run(data_dir, tmp_path, num_workers=1, micro_batch_size=8, lr=1e5, min_lr=0.0, warmup_steps=0,
            max_steps=20, checkpoint_interval=1, log_interval=1, eval_rows=0)
    assert list((tmp_path / "checkpoints" / "train").glob("checkpoint_*"))
    assert not (tmp_path / "model").exists()


def test_bad_input_fails_fast_with_named_problem(data_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        run(tmp_path / "nope", tmp_path / "r1", num_workers=1)
    with pytest.raises(DataError, match="vocab"):
        run(data_dir, tmp_path / "r2", num_workers=1, model={"vocab_size": 256})
    with pytest.raises(DataError, match="seq_len"):
        run(data_dir, tmp_path / "r3", num_workers=1, model={"max_seq_len": 16})
    with pytest.raises(TrainingError, match="64 training workers need 64 CPUs but the Ray cluster has 4"):
        run(data_dir, tmp_path / "r4", num_workers=64, global_batch_size=64)
    # GPUs may come from an autoscaler: "true" waits for them (worker_wait_s), then names the wait.
    t0 = time.monotonic()
    with pytest.raises(TrainingError, match=r"need 1 GPUs; the Ray cluster still has 0 after waiting 1.5 s"):
        run(data_dir, tmp_path / "r7", num_workers=1, use_gpu="true", worker_wait_s=1.5)
    assert time.monotonic() - t0 >= 1.5
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="storage path .* is not writable"):
        run(data_dir, tmp_path / "r5", num_workers=1, storage_path=str(blocker / "sub"))
    with pytest.raises(DataError, match="fewer than one global batch"):
        run(data_dir, tmp_path / "r6", num_workers=1, global_batch_size=100_000)
