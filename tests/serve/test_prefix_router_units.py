"""The prefix-aware router's choice, without a Ray runtime: fake replicas with set loads and reports.

Longest cached prefix wins while the load is balanced; an imbalanced load, no match, no report or
a request without a prompt fall back to Serve's power-of-two choice; prompts this router sent
count before the replica reports them. Plus the config field and its wiring into Serve options.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from fastserve_ray.engine.prefix_summary import encode_summary, prompt_block_hashes
from fastserve_ray.errors import ConfigError
from fastserve_ray.serve.builder import deployment_options
from fastserve_ray.serve.config import ServeConfig
from fastserve_ray.serve.prefix_router import ROUTER_CLASS_PATH, PrefixAwareRouter, uses_prefix_router
from fastserve_ray.serve.server import LLMServer, PromptBuilder

DID = DeploymentID(name="LLMServer-tiny", app_name="fastserve")
BS = 16


class FakeReplica:
    """What the router reads of a RunningReplica."""

    def __init__(self, name: str, queue_len: int = 0, cached: list[int] | None = None,
                 max_ongoing: int = 8) -> None:
        self.replica_id = ReplicaID(name, DID)
        self.queue_len = queue_len
        self.max_ongoing_requests = max_ongoing
        self.routing_stats: dict[str, Any] = {}
        if cached is not None:
            summary = encode_summary(BS, cached, len(cached))
            self.routing_stats = {"prefix_cache": summary, "max_model_len": 256}
        self.node_id, self.availability_zone, self.multiplexed_model_ids = "node", None, set()
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def _router(tokenizer: Any, replicas: list[FakeReplica], threshold: float = 2) -> PrefixAwareRouter:
    router = PrefixAwareRouter(deployment_id=DID, handle_source=DeploymentHandleSource.UNKNOWN,
                               use_replica_queue_len_cache=True)
    router.initialize_state(block_size=BS, imbalanced_threshold=threshold,
                            prompt_builder=PromptBuilder(tokenizer, 256, "tiny"))
    router.update_replicas(replicas)  # type: ignore[arg-type]
    for r in replicas:
        router._replica_queue_len_cache.update(r.replica_id, r.queue_len)
    return router


def _pending(body: dict[str, Any], n: int = 0, kind: str = "completion",
             method: str = "generate") -> PendingRequest:
    meta = RequestMetadata(request_id=f"r{n}", internal_request_id=f"i{n}", call_method=method)
    return PendingRequest(args=[kind, {"model": "tiny", **body}, f"r{n}"], kwargs={}, metadata=meta)


PROMPT = list(range(3, 3 + 5 * BS + 3))  # token ids: 5 hashable blocks
CHAIN = prompt_block_hashes(PROMPT, BS)


def test_the_longest_cached_prefix_wins_when_the_load_is_balanced(tiny_tokenizer):
    async def main():
        replicas = [FakeReplica("a", 1, CHAIN[:2]), FakeReplica("b", 2, CHAIN[:4]), FakeReplica("c", 0, [])]
        router = _router(tiny_tokenizer, replicas)
        ranks = await router.choose_replicas(replicas, _pending({"prompt": PROMPT}))
        assert [r.replica_id.unique_id for r in ranks[0]] == ["b"]  # 4 blocks; load 2 vs lowest 0
        assert len(ranks) == 2 and len(ranks[1]) == 2  # then the power-of-two pair, if b is full
        assert router.matched_blocks(replicas[0].replica_id, [CHAIN]) == 2
        assert router.decisions == {"prefix": 1}

    asyncio.run(main())


def test_an_imbalanced_load_goes_to_the_power_of_two_choice(tiny_tokenizer):
    async def main():
        replicas = [FakeReplica("a", 5, CHAIN), FakeReplica("b", 0, []), FakeReplica("c", 0, [])]
        router = _router(tiny_tokenizer, replicas, threshold=2)
        ranks = await router.choose_replicas(replicas, _pending({"prompt": PROMPT}))
        assert len(ranks) == 1 and len(ranks[0]) == 2  # Serve's default: two random replicas
        assert router.decisions == {"default_imbalanced": 1}
        # A full replica is never preferred either, whatever it caches.
        full = [FakeReplica("a", 8, CHAIN, max_ongoing=8), FakeReplica("b", 7, [])]
        router = _router(tiny_tokenizer, full, threshold=10)
        await router.choose_replicas(full, _pending({"prompt": PROMPT}))
        assert router.decisions == {"default_imbalanced": 1}

    asyncio.run(main())


def test_no_report_no_match_or_no_prompt_falls_back(tiny_tokenizer):
    async def main():
        replicas = [FakeReplica("a", 0), FakeReplica("b", 0)]  # nothing reported yet
        router = _router(tiny_tokenizer, replicas)
        ranks = await router.choose_replicas(replicas, _pending({"prompt": PROMPT}))
        assert len(ranks) == 1 and {r.replica_id.unique_id for r in ranks[0]} == {"a", "b"}
        await router.choose_replicas(replicas, _pending({"prompt": [1, 2]}, 1))  # shorter than a block
        await router.choose_replicas(replicas, _pending({"prompt": PROMPT, "temperature": "hot"}, 2))  # 400
        await router.choose_replicas(replicas, _pending({"prompt": PROMPT}, 3, method="tokenize"))
        await router.choose_replicas(replicas, None)
        assert router.decisions == {"default_no_match": 1, "default_no_prompt_info": 3}

    asyncio.run(main())


def test_a_prompt_routed_here_counts_before_the_replica_reports_it(tiny_tokenizer):
    async def main():
        replicas = [FakeReplica("a", 0, []), FakeReplica("b", 0, [])]
        router = _router(tiny_tokenizer, replicas)
        first = _pending({"prompt": PROMPT + [9, 9]})
        await router.choose_replicas(replicas, first)
        router.on_request_routed(first, replicas[1].replica_id, None)
        ranks = await router.choose_replicas(replicas, _pending({"prompt": PROMPT + [7]}, 1))
        assert [r.replica_id.unique_id for r in ranks[0]] == ["b"]
        # Once older than the TTL, only reports count (the replica may have evicted them).
        router._pending_ttl_s = 0.0
        router._expire(replicas[1].replica_id)
        assert router.matched_blocks(replicas[1].replica_id, [CHAIN]) == 0

    asyncio.run(main())


def test_a_new_report_replaces_the_old_one_and_removed_replicas_are_forgotten(tiny_tokenizer):
    async def main():
        a, b = FakeReplica("a", 0, CHAIN), FakeReplica("b", 0, [])
        router = _router(tiny_tokenizer, [a, b])
        assert router.matched_blocks(a.replica_id, [CHAIN]) == len(CHAIN)
        a2 = FakeReplica("a", 0, CHAIN[:1])
        router.update_replicas([a2, b])  # type: ignore[list-item]
        assert router.matched_blocks(a.replica_id, [CHAIN]) == 1
        router.update_replicas([b])  # type: ignore[list-item]
        assert router.matched_blocks(a.replica_id, [CHAIN]) == 0 and a.replica_id not in router._reported

    asyncio.run(main())


def test_router_and_server_build_the_same_prompt_ids(tiny_model_dir: Path):
    """Chat (template + special tokens), text and token-id prompts: the router's ids are the server's."""
    from fastserve_ray.tokenizer import Tokenizer

    server = LLMServer(str(tiny_model_dir), "tiny", {"max_num_seqs": 2})
    try:
        builder = PromptBuilder(Tokenizer.load(tiny_model_dir), server.max_model_len, "tiny")
        bodies = [("chat", {"messages": [{"role": "system", "content": "You are terse."},
                                         {"role": "user", "content": "What is a class?"}]}),
                  ("completion", {"prompt": "The for statement"}),
                  ("completion", {"prompt": ["a", "b c"]}),
                  ("completion", {"prompt": [5, 6, 7]})]
        for kind, body in bodies:
            body = {"model": "tiny", **body}
            assert builder.prompt_token_ids(kind, body) == server._prompts(server._parse(kind, body))
    finally:
        server.engine.shutdown()


def test_the_router_field_is_validated_and_wired(tiny_model_dir: Path):
    base = {"path": str(tiny_model_dir), "name": "tiny"}
    plain = ServeConfig.from_dict({"models": [base]})
    assert plain.models[0].router == "default"
    assert "request_router_config" not in deployment_options(plain.models[0])
    cfg = ServeConfig.from_dict({"models": [base | {"router": "prefix_aware", "engine": {"block_size": 8,
                                                                                       "max_num_seqs": 8}}]})
    rr = deployment_options(cfg.models[0])["request_router_config"]
    assert rr["request_router_class"] == ROUTER_CLASS_PATH
    assert rr["request_router_kwargs"] == {"model_path": str(tiny_model_dir.resolve()), "served_name": "tiny",
                                           "block_size": 8, "imbalanced_threshold": 2}
    with pytest.raises(ConfigError, match=r"models\.0\.router: Input should be 'default' or 'prefix_aware'"):
        ServeConfig.from_dict({"models": [base | {"router": "sticky"}]})
    with pytest.raises(ConfigError, match="router 'prefix_aware' needs ingress 'router'"):
        ServeConfig.from_dict({"ingress": "direct", "models": [base | {"router": "prefix_aware"}]})
    assert uses_prefix_router()  # outside a replica it cannot tell: it reports


def test_replicas_report_only_under_the_prefix_router(monkeypatch):
    """Serve polls record_routing_stats whatever the router: under the default one, report nothing."""
    from types import SimpleNamespace

    from ray import serve
    from ray.serve.config import RequestRouterConfig

    def context(router: RequestRouterConfig) -> Any:
        return SimpleNamespace(_deployment_config=SimpleNamespace(request_router_config=router))

    monkeypatch.setattr(serve, "get_replica_context", lambda: context(RequestRouterConfig()))
    assert not uses_prefix_router()
    ours = RequestRouterConfig(request_router_class=ROUTER_CLASS_PATH)
    monkeypatch.setattr(serve, "get_replica_context", lambda: context(ours))
    assert uses_prefix_router()


def test_the_bench_trace_shares_long_prefixes_and_no_replica_can_hold_them_all():
    from fastserve_ray.bench.prefix import BLOCK_SIZE, kv_blocks, make_prefix_trace

    trace = make_prefix_trace(96, 8, 384, 8192, 1, (24, 48), (16, 32), 1024)
    prefixes = {tuple(r.prompt[:384]) for r in trace}
    assert len(prefixes) == 8 and all(len(r.prompt) + r.output_len <= 1024 for r in trace)
    # Multi-turn: some prompt is another's continuation beyond the shared system prompt.
    assert any(a.prompt[:len(b.prompt)] == b.prompt for a in trace for b in trace
               if a is not b and len(a.prompt) > len(b.prompt) > 384)
    blocks = kv_blocks(trace, 8, 384, max_num_seqs=8)
    assert blocks * BLOCK_SIZE < 8 * 384  # one replica's cache cannot hold every prefix
    assert blocks * BLOCK_SIZE >= max(len(r.prompt) + r.output_len for r in trace)


def test_a_new_router_waits_for_its_tokenizer_instead_of_scattering_the_first_requests(tiny_model_dir):
    async def main():
        replicas = [FakeReplica("a", 0, []), FakeReplica("b", 0, CHAIN)]
        router = PrefixAwareRouter(deployment_id=DID, handle_source=DeploymentHandleSource.UNKNOWN,
                                   use_replica_queue_len_cache=True)
        router.initialize_state(model_path=str(tiny_model_dir), served_name="tiny", block_size=BS)
        router.update_replicas(replicas)  # type: ignore[arg-type]
        for r in replicas:
            router._replica_queue_len_cache.update(r.replica_id, r.queue_len)
        ranks = await router.choose_replicas(replicas, _pending({"prompt": PROMPT}))  # type: ignore[arg-type]
        assert [r.replica_id.unique_id for r in ranks[0]] == ["b"] and router.decisions == {"prefix": 1}

    asyncio.run(main())
