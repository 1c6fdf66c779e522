"""Prefix-aware routing on a real local Ray Serve: 2 replicas of the tiny model behind the router front.

Repeated requests that share a long prefix land on the replica that cached it, observed through
``usage.prompt_tokens_details.cached_tokens`` and ``system_fingerprint`` (the replica's id). A
DeploymentHandle in this process has its own router, which never sent those prompts: its
choices can only come from what the replicas report (``record_routing_stats``), so it checks
that path end to end. One private Ray (3 logical CPUs) and one Serve application per module.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from fastserve_ray.engine.prefix_summary import decode_summary, matched_blocks, prompt_block_hashes
from fastserve_ray.serve.client import complete_sync, get_model_handle
from fastserve_ray.serve.command import deploy, free_port
from fastserve_ray.serve.config import ServeConfig

pytestmark = pytest.mark.ray

BS = 16
PREFIX_LEN = 10 * BS  # 160 of the tiny model's 256 tokens
NUM_PREFIXES = 4


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path):
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    cfg = ServeConfig.from_dict({"models": [{
        "path": str(tiny_model_dir), "name": "tiny", "router": "prefix_aware", "num_cpus": 1,
        "engine": {"max_num_seqs": 4, "block_size": BS}, "stream_interval_ms": 0,
        "autoscaling": {"min_replicas": 2, "max_replicas": 2}}],
        "http": {"port": free_port()}})
    yield deploy(cfg)
    serve.shutdown()
    ray.shutdown()


def _prefixes() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 500) for _ in range(PREFIX_LEN)] for _ in range(NUM_PREFIXES)]


def _body(prompt: list[int]) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def _ask(client: httpx.Client, prompt: list[int]) -> tuple[str, int]:
    r = client.post("/v1/completions", json=_body(prompt))
    assert r.status_code == 200, r.text
    out = r.json()
    return out["system_fingerprint"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_repeated_prefixes_land_on_the_replica_that_cached_them(url: str) -> None:
    prefixes = _prefixes()
    with httpx.Client(base_url=url, timeout=60) as client:
        home = {}
        for i, p in enumerate(prefixes):  # first sight: no replica has it, least loaded of two
            home[i], cached = _ask(client, p + [7, i])
            assert cached == 0
        for turn in range(3):  # later turns: a different tail each time, same prefix
            for i, p in enumerate(prefixes):
                replica, cached = _ask(client, p + [9, turn, i, 5])
                assert replica == home[i], (i, turn)
                assert cached >= PREFIX_LEN, (i, turn, cached)
    print(f"\nprefix homes: {sorted(home.values())}")


def test_the_replicas_report_block_hashes_that_a_handle_router_follows(url: str) -> None:
    prefixes = _prefixes()
    handle = get_model_handle("tiny")
    # What a replica reports: its block size and 32-bit hashes of its cached blocks (no tokens).
    # Calls land on either replica: ten of them reach both but for a 2^-9 chance.
    union: set[int] = set()
    for _ in range(10):
        stats = handle.record_routing_stats.remote().result()
        summary = stats["prefix_cache"]
        block_size, cached = decode_summary(summary)
        assert block_size == BS and len(summary["hashes"]) == 4 * summary["num_reported"]
        union |= cached
    assert all(matched_blocks(prompt_block_hashes(p + [0], BS), union) == PREFIX_LEN // BS for p in prefixes)
    complete_sync(handle, _body([5] * 40))  # creates this process's router (it waits for its tokenizer)
    time.sleep(1.0)  # a routing-stats period: the reports this handle holds are current
    with httpx.Client(base_url=url, timeout=60) as client:
        home = {i: _ask(client, p + [7, i])[0] for i, p in enumerate(prefixes)}
    for turn in range(2):  # 8 requests: 1 in 256 to pass by chance with a random router
        for i, p in enumerate(prefixes):
            out = complete_sync(handle, _body(p + [11, turn, i]))
            assert out["system_fingerprint"] == home[i], (i, turn)
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= PREFIX_LEN, (i, turn)
