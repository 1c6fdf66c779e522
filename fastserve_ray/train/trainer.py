"""Driver side of training: validate inputs, build the TorchTrainer, run it, export the results.

``run_training`` is what `fastserve-ray train` and jobs/train.py call. It works
against a local Ray started on demand or the cluster a job was submitted to.
Outputs in RUN_DIR: model/ (a model directory), metrics.jsonl, loss_curve.png,
and checkpoints/ (Ray Train's storage, unless storage_path says otherwise).
DATA_DIR, RUN_DIR and storage_path may each be a local path or an object-store
URI (``s3://bucket/prefix``): workers read rows straight from the data location.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from fastserve_ray import storage
from fastserve_ray.cluster import ensure_ray
from fastserve_ray.config import ModelConfig, TrainConfig
from fastserve_ray.data import check_data_fits_model, load_data_manifest
from fastserve_ray.data.manifest import MANIFEST_NAME, TOKENIZER_NAME
from fastserve_ray.errors import DataError, FastServeError
from fastserve_ray.models import build_model, parse_preset_spec, save_model_dir
from fastserve_ray.tokenizer import SIDE_FILES, Tokenizer
from fastserve_ray.train.checkpoint import load_model_weights, read_state
from fastserve_ray.train.loop import read_group_log, resizes_of, train_loop_per_worker
from fastserve_ray.train.peak import probe_peak_flops
from fastserve_ray.train.plot import plot_loss_curve


class TrainingError(FastServeError):
    """Training stopped for a reason the user must act on (non-finite loss, no capacity)."""


@dataclass
class TrainResult:
    """Where a finished run put its outputs, and its last metrics."""

    run_dir: Path | str  # a str for object-store URIs
    model_dir: Path | str
    checkpoint_path: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    resumes: list[dict[str, Any]]  # one entry per restart from a checkpoint: step, num_workers
    resizes: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # step, from, to


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset spec with the config's ``model`` overrides applied."""
    base = parse_preset_spec(cfg.preset)
    return base.replace(**cfg.model) if cfg.model else base


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.use_gpu == "auto":
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        if not gpus:
            # "auto" sees the cluster as it is now: a GPU group that scales from zero has none yet.
            print("[train] use_gpu auto: no GPU in the cluster now, training on CPU; set use_gpu: true to "
                  "wait for GPU workers an autoscaler adds", flush=True)
        return gpus
    return cfg.use_gpu == "true"


def _check_capacity(cfg: TrainConfig, use_gpu: bool, poll_s: float = 1.0) -> None:
    """Fail fast when even the minimum worker count cannot be placed (no silent hang).

    GPUs may be on their way: with ``use_gpu: true`` the missing ones are requested from the
    autoscaler (a no-op without one) and waited for up to ``worker_wait_s``, with a progress
    line every 10 s, before the run fails naming what it waited for.
    """
    min_workers = cfg.worker_range[0]
    resource = "GPU" if use_gpu else "CPU"
    have = ray.cluster_resources().get(resource, 0)
    if have >= min_workers:
        return
    if not use_gpu:
        raise TrainingError(
            f"{min_workers} training workers need {min_workers} CPUs but the Ray cluster has {have:g}; "
            "lower --num-workers or add nodes")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * min_workers)
    start = last = time.monotonic()
    while (have := ray.cluster_resources().get("GPU", 0)) < min_workers:
        waited = time.monotonic() - start
        if waited >= cfg.worker_wait_s:
            raise TrainingError(
                f"{min_workers} training workers need {min_workers} GPUs; the Ray cluster still has "
                f"{have:g} after waiting {cfg.worker_wait_s:g} s (worker_wait_s) for an autoscaler to add "
                "them")
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            print(f"[train] waiting for GPU workers: {have:g}/{min_workers} ({waited:.0f}s)", flush=True)
        time.sleep(poll_s)


def measure_peak_flops(use_gpu: bool) -> float:
    """The GEMM probe, run once in a Ray task holding one worker's resources (idle, before training)."""
    task = ray.remote(probe_peak_flops).options(num_gpus=1 if use_gpu else 0, num_cpus=1)
    return float(ray.get(task.remote("cuda" if use_gpu else "cpu")))


def make_loop_config(data_dir: str, cfg: TrainConfig, model_cfg: ModelConfig, row_len: int,
                     has_validation: bool, peak_flops: float, fault_marker: str = "") -> dict[str, Any]:
    """What loop.run_loop needs: configs, where the rows are, the peak MFU divides by."""
    return {"train": cfg.to_dict(), "model": model_cfg.to_dict(), "row_len": row_len, "data_dir": data_dir,
            "has_validation": has_validation, "peak_flops": peak_flops, "fault_marker": fault_marker}


def group_log_path(storage_path: str, run_name: str) -> str:
    """The run's log of worker-group starts (for resizes), beside its checkpoints."""
    return storage.join(storage_path, run_name, "worker_groups.jsonl")


def build_trainer(
    data_dir: str, cfg: TrainConfig, model_cfg: ModelConfig, row_len: int, storage_path: str,
    has_validation: bool,
) -> TorchTrainer:
    """The TorchTrainer for ``cfg``: scaling, failure and checkpoint policy; workers read ``data_dir``."""
    use_gpu = _use_gpu(cfg)
    _check_capacity(cfg, use_gpu)
    min_w, max_w = cfg.worker_range
    loop_config = make_loop_config(data_dir, cfg, model_cfg, row_len, has_validation,
                                   cfg.peak_flops or measure_peak_flops(use_gpu),
                                   storage.join(storage_path, cfg.run_name, ".fault_injected"))
    loop_config["group_log"] = group_log_path(storage_path, cfg.run_name)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=(min_w, max_w) if min_w != max_w else max_w,
            elastic_resize_monitor_interval_s=cfg.elastic_resize_interval_s,
            use_gpu=use_gpu,
            resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
        ),
    )


def _location(path: str | Path) -> str:
    """A URI as given, a local path made absolute (workers may run elsewhere in the tree)."""
    return str(path) if storage.is_uri(path) else str(Path(path).resolve())


def run_training(data_dir: str | Path, run_dir: str | Path, cfg: TrainConfig) -> TrainResult:
    """Train on a prepared data directory; write the model directory and metrics into ``run_dir``."""
    data_dir, run_dir = _location(data_dir), _location(run_dir)
    manifest = load_data_manifest(data_dir)
    model_cfg = resolve_model_config(cfg)
    with tempfile.TemporaryDirectory(prefix="fastserve-train-") as scratch:
        local_tokenizer = Path(scratch) / TOKENIZER_NAME
        local_tokenizer.write_bytes(storage.read_bytes(storage.join(data_dir, TOKENIZER_NAME)))
        for name in SIDE_FILES:  # the chat template etc. travel with the tokenizer into the model
            if storage.is_file(storage.join(data_dir, name)):
                (Path(scratch) / name).write_bytes(storage.read_bytes(storage.join(data_dir, name)))
        tokenizer = Tokenizer.load(local_tokenizer)
        check_data_fits_model(manifest, model_cfg, tokenizer)
        train_rows = manifest.split("train").num_rows
        if train_rows < cfg.global_batch_size:
            raise DataError(
                f"{data_dir}: the training split has {train_rows} rows, fewer than one global batch "
                f"({cfg.global_batch_size}); prepare more data or lower global_batch_size"
            )
        storage.check_writable(run_dir, "run directory")
        storage_path = (_location(cfg.storage_path) if cfg.storage_path
                        else storage.join(run_dir, "checkpoints"))
        storage.check_writable(storage_path, "storage path")
        ensure_ray()
        has_val = manifest.split("validation").num_rows > 0 and cfg.eval_rows > 0
        trainer = build_trainer(data_dir, cfg, model_cfg, manifest.row_len, storage_path, has_val)
        result = trainer.fit()
        if result.checkpoint is None:
            raise TrainingError(f"training stopped before its first checkpoint (storage {storage_path})")
        with result.checkpoint.as_directory() as d:
            state = read_state(Path(d))
            model = build_model(model_cfg)
            load_model_weights(Path(d), model)
        history = state["history"]
        resizes = resizes_of(read_group_log(group_log_path(storage_path, cfg.run_name)))
        outputs = Path(scratch) / "run"
        outputs.mkdir()
        _write_metrics(outputs, history)
        _publish_files(outputs, run_dir)
        if result.metrics and result.metrics.get("nonfinite_loss"):
            raise TrainingError(
                f"loss became non-finite at step {result.metrics['nonfinite_at_step']}; training stopped "
                f"before applying that update and the last good checkpoint (step {state['step']}) is kept "
                f"at {result.checkpoint.path}. Lower lr or check the data."
            )
        lineage = {
            "data": {"path": data_dir,
                     "manifest_sha256": storage.sha256(storage.join(data_dir, MANIFEST_NAME))},
            "training": {"run_name": cfg.run_name, "storage_path": storage_path,
                         "config": cfg.to_dict(), "final_step": state["step"],
                         "resumes": state.get("resumes", []),
                         "resizes": resizes,
                         "final_metrics": history[-1] if history else {}},
        }
        # An s3:// run: written locally, then uploaded with its manifest last (models/model_store.py).
        model_dir = save_model_dir(storage.join(run_dir, "model"), model, tokenizer, lineage=lineage,
                                   overwrite=True)
    out = run_dir if storage.is_uri(run_dir) else Path(run_dir)
    return TrainResult(out, model_dir, str(result.checkpoint.path), history[-1] if history else {},
                       history, state.get("resumes", []), resizes)


def _publish_files(local_dir: Path, run_dir: str) -> None:
    """Copy each file of ``local_dir`` into ``run_dir`` (a path or URI)."""
    for path in sorted(local_dir.iterdir()):
        if not path.is_file():
            continue
        dest = storage.join(run_dir, path.name)
        if storage.is_uri(run_dir):
            fs, inner = storage.resolve(dest)
            with fs.open_output_stream(inner) as f:
                f.write(path.read_bytes())
        else:
            tmp = Path(dest).with_name(f".{path.name}.tmp")
            shutil.copyfile(path, tmp)
            tmp.replace(dest)


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    with open(run_dir / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    if history:
        plot_loss_curve(history, run_dir / "loss_curve.png")
