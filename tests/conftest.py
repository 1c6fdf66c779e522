"""Shared fixtures: a small trained tokenizer and tiny model directories (no downloads)."""

from __future__ import annotations

import dataclasses
import pydoc_data.topics
from pathlib import Path

import pytest
import torch

from fastserve_ray.models import build_model, get_preset, save_model_dir
from fastserve_ray.tokenizer import Tokenizer, train_tokenizer

# Modules that start a Ray runtime (-m "not ray" is the quick tier), and end-to-end modules.
RAY_MODULES = {
    "compress/test_graph.py", "data/test_data_ray.py", "serve/test_autoscale.py", "serve/test_direct.py",
    "serve/test_http.py", "serve/test_two_nodes.py", "serve/test_entrypoints.py",
    "test_ray_job_submit.py", "train/test_elastic.py", "train/test_ray_training.py",
    "train/test_streaming_data.py", "test_cli.py", "compress/test_bench_compress.py",
    "serve/test_object_storage_cluster.py", "serve/test_scale_to_zero.py", "test_pipeline.py",
    "serve/test_prefix_router.py",
}
E2E_MODULES = {
    "test_cli.py", "test_ray_job_submit.py", "serve/test_entrypoints.py", "test_bench.py",
    "test_bench_engine_quick.py", "compress/test_bench_compress.py", "test_cpu_plans.py", "test_pipeline.py",
}
TESTS = Path(__file__).resolve().parent
# The longest modules (measured, see docs/development.md), started first: scripts/test.sh hands
# whole modules to two processes (pytest-xdist --dist loadfile), and a long module picked up
# last would run alone at the end.
LONGEST_FIRST = [
    "train/test_ray_training.py", "test_pipeline.py", "train/test_elastic.py", "test_cli.py",
    "test_ray_job_submit.py", "serve/test_autoscale.py", "serve/test_scale_to_zero.py",
    "train/test_streaming_data.py", "serve/test_entrypoints.py", "compress/test_bench_compress.py",
    "serve/test_object_storage_cluster.py", "serve/test_http.py", "serve/test_two_nodes.py",
    "serve/test_direct.py", "serve/test_prefix_router.py",
]


def _rel(item: pytest.Item) -> str:
    return Path(item.fspath).resolve().relative_to(TESTS).as_posix()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_rel(item), len(rank)))  # stable: order kept within
    for item in items:
        rel = _rel(item)
        if rel in RAY_MODULES:
            item.add_marker(pytest.mark.ray)
        if rel in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A 400-token byte-level BPE trained on the bundled Python docs, saved to disk."""
    tok = train_tokenizer(sorted(pydoc_data.topics.topics.values())[:20], vocab_size=400)
    path = tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return Tokenizer.load(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    """A model directory holding a randomly initialised `tiny` decoder."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"))
    out = tmp_path_factory.mktemp("models") / "tiny"
    return save_model_dir(out, model, tiny_tokenizer, lineage={"note": "test fixture"})


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    """The `tiny` decoder with a 1024-token context: chats with tool definitions are long."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(get_preset("tiny"), max_seq_len=1024))
    out = tmp_path_factory.mktemp("models") / "tiny-long"
    return save_model_dir(out, model, tiny_tokenizer, lineage={"note": "test fixture"})
