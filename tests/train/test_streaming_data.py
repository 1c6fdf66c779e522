"""Streaming training data: bounded worker memory on a 10x corpus, and s3:// data, storage and outputs.

The S3 endpoint is a moto server started here on 127.0.0.1; Ray's workers find it through the
standard AWS environment variables, set before Ray starts so every worker inherits them.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
import ray
import torch
from s3_server import local_s3
from synthetic import write_random_data

from fastserve_ray import storage
from fastserve_ray.config import TrainConfig
from fastserve_ray.models import load_model_dir
from fastserve_ray.train.trainer import run_training

SMALL_ROWS, SEQ_LEN = 6000, 255  # rows of 256 int32 tokens: 6 MB small, 60 MB for the 10x corpus
TRAIN = dict(preset="tiny", num_workers=2, global_batch_size=8, micro_batch_size=4, max_steps=6,
             warmup_steps=1, log_interval=3, checkpoint_interval=3, eval_interval=6, eval_rows=16,
             lr=2e-3, min_lr=2e-4, peak_flops=1e11)


@pytest.fixture(scope="module")
def s3_endpoint():
    with local_s3(bucket=None) as env:
        yield env


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_endpoint):
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # faster failure detection
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _params(model_dir) -> dict[str, torch.Tensor]:
    return load_model_dir(model_dir).model.state_dict()


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_tokenizer):
    """The small generated corpus and a local run on it (the reference for the other tests)."""
    root = tmp_path_factory.mktemp("small")
    data = write_random_data(root / "data", tiny_tokenizer, SMALL_ROWS, SEQ_LEN)
    return data, run_training(data, root / "run", TrainConfig(**TRAIN))


def test_worker_memory_is_bounded_on_a_10x_corpus(tmp_path, tiny_tokenizer, small):
    data = write_random_data(tmp_path / "data", tiny_tokenizer, 10 * SMALL_ROWS, SEQ_LEN)
    large = run_training(data, tmp_path / "run", TrainConfig(**TRAIN))
    assert large.metrics["step"] == TRAIN["max_steps"]
    # The largest worker's peak in each run (a Ray worker process may be reused by the next run,
    # which can only raise the large run's figure).
    peaks = {name: max(m["peak_rss_mb"] for m in r.history) for name, r in (("small", small[1]),
                                                                          ("large", large))}
    extra_mb = 9 * SMALL_ROWS * (SEQ_LEN + 1) * 4 / 2**20
    growth = peaks["large"] - peaks["small"]
    print(f"worker peak RSS: {peaks['small']:.0f} MB small, {peaks['large']:.0f} MB with "
          f"{extra_mb:.0f} MB more tokens")
    # Holding the split in a worker (the former design) would add >= extra_mb (~53 MB).
    assert growth < 16, f"worker peak RSS grew {growth:.1f} MB for {extra_mb:.0f} MB more data"


def test_s3_data_storage_and_outputs_with_a_killed_worker(tmp_path, small, s3_endpoint):
    import boto3

    boto3.client("s3").create_bucket(Bucket="fsr")
    fs, _ = storage.resolve("s3://fsr/data")
    pafs.copy_files(str(small[0]), "fsr/data", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)

    remote = run_training("s3://fsr/data", "s3://fsr/run", TrainConfig(**TRAIN, fail_at_step=4))
    assert remote.model_dir == "s3://fsr/run/model"
    assert storage.is_file("s3://fsr/run/checkpoints/train/.fault_injected")  # the worker did die
    assert len(remote.resumes) == 1 and remote.resumes[0]["step"] == 3
    assert storage.read_bytes("s3://fsr/run/metrics.jsonl").count(b"\n") == len(remote.history)
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    pafs.copy_files("fsr/run/model", str(downloaded), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    a, b = _params(downloaded), _params(small[1].model_dir)  # load_model_dir verifies the checksums
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert load_model_dir(downloaded).manifest["lineage"]["data"]["path"] == "s3://fsr/data"
