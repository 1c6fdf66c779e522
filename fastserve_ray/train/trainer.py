"""Driver side of training: validate inputs, build the TorchTrainer, run it, export the results.

``run_training`` is what `fastserve-ray train` and jobs/train.py call. It works
against a local Ray started on demand or the cluster a job was submitted to.
Outputs in RUN_DIR: model/ (a model directory), metrics.jsonl, loss_curve.png,
and checkpoints/ (Ray Train's storage, unless storage_path says otherwise).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from fastserve_ray.cluster import ensure_ray
from fastserve_ray.config import ModelConfig, TrainConfig
from fastserve_ray.data import check_data_fits_model, load_data_manifest
from fastserve_ray.errors import ConfigError, DataError, FastServeError
from fastserve_ray.models import build_model, parse_preset_spec, save_model_dir
from fastserve_ray.tokenizer import Tokenizer, file_sha256
from fastserve_ray.train.checkpoint import load_model_weights, read_state
from fastserve_ray.train.loop import train_loop_per_worker
from fastserve_ray.train.plot import plot_loss_curve
from fastserve_ray.train.rows import load_row_blocks


class TrainingError(FastServeError):
    """Training stopped for a reason the user must act on (non-finite loss, no capacity)."""


@dataclass
class TrainResult:
    """Where a finished run put its outputs, and its last metrics."""

    run_dir: Path
    model_dir: Path
    checkpoint_path: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    resumes: list[dict[str, Any]]  # one entry per restart from a checkpoint: step, num_workers


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset spec with the config's ``model`` overrides applied."""
    base = parse_preset_spec(cfg.preset)
    return base.replace(**cfg.model) if cfg.model else base


def _check_writable(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path} is not writable: {e.strerror or e}") from None


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.use_gpu == "true"


def _check_capacity(cfg: TrainConfig, use_gpu: bool) -> None:
    """Fail fast when even the minimum worker count can never be placed (no silent hang)."""
    total = ray.cluster_resources()
    min_workers = cfg.worker_range[0]
    resource, per_worker = ("GPU", 1) if use_gpu else ("CPU", 1)
    have = total.get(resource, 0)
    if have < min_workers * per_worker:
        raise TrainingError(
            f"{min_workers} training workers need {min_workers * per_worker} {resource}s but the "
            f"Ray cluster has {have:g}; lower --num-workers or add nodes"
        )


def build_trainer(
    data_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, row_len: int, storage: Path,
    has_validation: bool,
) -> TorchTrainer:
    """The TorchTrainer for ``cfg``: scaling, failure and checkpoint policy, data as object refs."""
    use_gpu = _use_gpu(cfg)
    _check_capacity(cfg, use_gpu)
    min_w, max_w = cfg.worker_range
    loop_config = {
        "train": cfg.to_dict(),
        "model": model_cfg.to_dict(),
        "row_len": row_len,
        "train_blocks": load_row_blocks(data_dir, "train"),
        "val_blocks": load_row_blocks(data_dir, "validation") if has_validation else [],
        "fault_marker": str(storage / cfg.run_name / ".fault_injected"),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=(min_w, max_w) if min_w != max_w else max_w,
            use_gpu=use_gpu,
            resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
        ),
    )


def run_training(data_dir: str | Path, run_dir: str | Path, cfg: TrainConfig) -> TrainResult:
    """Train on a prepared data directory; write the model directory and metrics into ``run_dir``."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    manifest = load_data_manifest(data_dir)
    model_cfg = resolve_model_config(cfg)
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    check_data_fits_model(manifest, model_cfg, tokenizer)
    train_rows = manifest.split("train").num_rows
    if train_rows < cfg.global_batch_size:
        raise DataError(
            f"{data_dir}: the training split has {train_rows} rows, fewer than one global batch "
            f"({cfg.global_batch_size}); prepare more data or lower global_batch_size"
        )
    _check_writable(run_dir, "run directory")
    storage = Path(cfg.storage_path) if cfg.storage_path else run_dir / "checkpoints"
    _check_writable(storage, "storage path")
    ensure_ray()
    has_val = manifest.split("validation").num_rows > 0 and cfg.eval_rows > 0
    trainer = build_trainer(data_dir, cfg, model_cfg, manifest.row_len, storage.resolve(), has_val)
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainingError(f"training stopped before its first checkpoint (storage {storage})")
    with result.checkpoint.as_directory() as d:
        state = read_state(Path(d))
        model = build_model(model_cfg)
        load_model_weights(Path(d), model)
    history = state["history"]
    _write_metrics(run_dir, history)
    if result.metrics and result.metrics.get("nonfinite_loss"):
        raise TrainingError(
            f"loss became non-finite at step {result.metrics['nonfinite_at_step']}; training stopped "
            f"before applying that update and the last good checkpoint (step {state['step']}) is kept "
            f"at {result.checkpoint.path}. Lower lr or check the data."
        )
    lineage = {
        "data": {"path": str(data_dir.resolve()), "manifest_sha256": file_sha256(manifest_path(data_dir))},
        "training": {"run_name": cfg.run_name, "storage_path": str(storage.resolve()),
                     "config": cfg.to_dict(), "final_step": state["step"],
                     "resumes": state.get("resumes", []),
                     "final_metrics": history[-1] if history else {}},
    }
    model_dir = save_model_dir(run_dir / "model", model, tokenizer, lineage=lineage, overwrite=True)
    return TrainResult(run_dir, model_dir, str(result.checkpoint.path), history[-1] if history else {},
                       history, state.get("resumes", []))


def manifest_path(data_dir: Path) -> Path:
    return data_dir / "data_manifest.json"


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    with open(run_dir / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    if history:
        plot_loss_curve(history, run_dir / "loss_curve.png")
