"""A cluster shaped like KubeRay's: a head with num-cpus 0 (where the driver runs) and two workers
that share no directory, each with its own model cache. Compression finishes there (its write
task once needed a CPU on the driver's node), reads and writes s3://, and the result is served
from s3:// by a replica on each worker: every worker downloads the artifact once, 0 requests fail."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from s3_server import local_s3
from serve_helpers import wait_for

from fastserve_ray.compress.graph import run_graph
from fastserve_ray.compress.pipeline import CompressOptions
from fastserve_ray.compress.recipe import load_recipe
from fastserve_ray.models import load_model_dir, save_model_dir
from fastserve_ray.models.model_dir import read_manifest
from fastserve_ray.models.model_store import CACHE_ENV, DOWNLOAD_LOG
from fastserve_ray.serve.command import deploy, free_port
from fastserve_ray.serve.config import ServeConfig

SOURCE = "s3://fsr/models/tiny"
COMPRESSED = "s3://fsr/models/tiny-int8"
OPTIONS = CompressOptions(num_calibration_rows=8, num_validation_rows=8, seq_len=32, overwrite=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir: Path):
    root = tmp_path_factory.mktemp("nodes")
    caches = [root / "worker-a-cache", root / "worker-b-cache"]
    with local_s3():  # AWS_* set before any raylet starts: every worker inherits them
        loaded = load_model_dir(tiny_model_dir)
        save_model_dir(SOURCE, loaded.model, loaded.tokenizer, lineage={"note": "on s3"}, overwrite=True)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for cache in caches:  # the raylet's environment is its workers' environment
            c.add_node(num_cpus=1, env_vars={CACHE_ENV: str(cache)})
        ray.init(address=c.address)
        c.wait_for_nodes()
        try:
            yield c, caches
        finally:
            serve.shutdown()
            ray.shutdown()
            c.shutdown()


def _downloads(cache: Path, location: str) -> int:
    log = cache / DOWNLOAD_LOG
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(json.loads(line)["location"] == location for line in lines)


def _bounded(fn, timeout_s: float):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it has not returned in time."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"did not finish in {timeout_s:.0f} s (a task waiting for a CPU it cannot get?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_the_driver_runs_on_a_head_without_cpus(cluster) -> None:
    node = ray.get_runtime_context().get_node_id()
    (me,) = [n for n in ray.nodes() if n["NodeID"] == node]
    assert me["Resources"].get("CPU", 0) == 0  # what makes the next test a reproduction


def test_compression_to_a_local_path_finishes_on_a_cpu_less_head(cluster, tmp_path) -> None:
    out = tmp_path / "int8"
    result = _bounded(lambda: run_graph(SOURCE, out, load_recipe("int8"), options=OPTIONS), 240)
    assert result.out_dir == out and read_manifest(out)["lineage"]["compressed_from"] == SOURCE


def test_compression_from_and_to_s3_reads_through_the_workers_caches(cluster) -> None:
    _, caches = cluster
    result = _bounded(lambda: run_graph(SOURCE, COMPRESSED, load_recipe("int8"), options=OPTIONS), 240)
    assert result.out_dir == COMPRESSED
    # The tasks ran on the workers and fetched the source there: at most once per node.
    per_node = [_downloads(cache, SOURCE) for cache in caches]
    assert sum(per_node) >= 1 and max(per_node) == 1, per_node


def test_serving_from_s3_on_two_nodes_downloads_once_per_node(cluster) -> None:
    _, caches = cluster
    cfg = ServeConfig.from_dict({"models": [{
        "path": COMPRESSED, "name": "tiny", "engine": {"max_num_seqs": 4},
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},
    }], "http": {"port": free_port(), "proxy_location": "HeadOnly"}})
    url = _bounded(lambda: deploy(cfg, log_level="WARNING"), 240)
    statuses: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as h:
            for i in range(6):
                r = h.post("/v1/completions", json={"model": "tiny", "prompt": f"from s3 {i}",
                                                    "max_tokens": 4, "ignore_eos": True})
                statuses.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert statuses == [200] * 24
    # One replica per worker (1 CPU each), each loading from its own node's cache: one download each,
    # though the replica's engine process and the replica both asked for it.
    assert [_downloads(cache, COMPRESSED) for cache in caches] == [1, 1]
    wait_for(lambda: httpx.get(f"{url}/v1/models", timeout=10).status_code == 200, 30, "the model list")
