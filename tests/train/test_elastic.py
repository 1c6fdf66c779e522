"""A real elastic resize on a local two-node Ray cluster: grow 1 -> 2 when a node joins, shrink 2 -> 1
when it leaves, and finish with the parameters of an uninterrupted run (the global batch is fixed).

ray.cluster_utils.Cluster starts a head and a second raylet, each with its own CPUs, and stops
only what it started (never `ray stop`, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from fastserve_ray.config import TrainConfig
from fastserve_ray.data import prepare_data
from fastserve_ray.models import load_model_dir
from fastserve_ray.train.trainer import run_training

# Steps are paced (step_delay_s) while the test's pace file exists, so the run is still going when
# each resize happens however slow the machine; once both were seen, the rest runs at full speed.
CFG = dict(preset="tiny", num_workers=2, min_workers=1, global_batch_size=8, micro_batch_size=4,
           max_steps=200, warmup_steps=2, lr=2e-3, min_lr=2e-4, log_interval=4, checkpoint_interval=4,
           eval_rows=0, peak_flops=1e11, max_failures=5, elastic_resize_interval_s=1.0, step_delay_s=0.3)


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # After a node leaves, Ray Train's resource view can still count its CPUs for a moment and
    # try the old size first; that attempt gives up after this timeout (default 60 s) and the
    # group restarts with what is left.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def _latest_state(storage: Path) -> dict:
    """train_state.json of the newest committed checkpoint, {} before the first."""
    states = []
    for path in glob.glob(str(storage / "train" / "checkpoint_*" / "train_state.json")):
        try:
            states.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # being written or pruned right now
    return max(states, key=lambda s: s["step"], default={})


def _wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_elastic_run_grows_and_shrinks_and_matches_an_uninterrupted_run(cluster, tmp_path, tiny_tokenizer):
    data = tmp_path / "data"
    prepare_data(data, tokenizer_path=tiny_tokenizer.path, seq_len=32, rows_per_shard=2000, progress=False)
    # Checkpointing does not change the optimisation: the reference only checkpoints at the end.
    reference = run_training(data, tmp_path / "ref", TrainConfig(**{
        **CFG, "num_workers": 1, "min_workers": None, "step_delay_s": 0.0,
        "checkpoint_interval": CFG["max_steps"], "log_interval": 50}))

    outcome: dict = {}
    run_dir = tmp_path / "elastic"
    pace = tmp_path / "pace"
    pace.write_text("slow steps until both resizes were seen\n")
    cfg = TrainConfig(**CFG, step_delay_file=str(pace))
    thread = threading.Thread(target=lambda: outcome.update(result=run_training(data, run_dir, cfg)))
    thread.start()
    storage = run_dir / "checkpoints"
    _wait_for(lambda: _latest_state(storage).get("num_workers") == 1, "a checkpoint from 1 worker")
    node = cluster.add_node(num_cpus=1)  # room for the second worker
    _wait_for(lambda: _latest_state(storage).get("num_workers") == 2, "the group to grow to 2 workers")
    cluster.remove_node(node)  # its worker dies with it
    groups = storage / "train" / "worker_groups.jsonl"
    _wait_for(lambda: groups.is_file() and groups.read_text().splitlines()[-1].endswith('"num_workers": 1}')
              and '"num_workers": 2' in groups.read_text(), "a 1-worker group after the 2-worker one")
    pace.unlink()
    _wait_for(lambda: not thread.is_alive(), "the run to finish", timeout=300)
    result = outcome["result"]

    assert [(r["from"], r["to"]) for r in result.resizes] == [(1, 2), (2, 1)]
    assert result.metrics["step"] == CFG["max_steps"] and result.metrics["num_workers"] == 1
    lineage = load_model_dir(result.model_dir).manifest["lineage"]["training"]
    assert lineage["resizes"] == result.resizes  # recorded in the run's manifest
    a = load_model_dir(result.model_dir).model.state_dict()
    b = load_model_dir(reference.model_dir).model.state_dict()
    diff = max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)
    assert diff <= 1e-5, f"elastic run differs from the uninterrupted one by {diff:.2e}"
