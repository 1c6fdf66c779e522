"""Prefix-aware routing: send a prompt to the replica whose engine already caches its prefix.

A Ray Serve ``RequestRouter`` (``models[].router: prefix_aware``). It runs wherever a
DeploymentHandle to a model's LLM servers routes: in the router front (``ingress: router``)
and in any handle caller (``fastserve_ray.serve.client``). For each generation request it

1. builds the prompt's token ids exactly as a replica will (``PromptBuilder``, the server's own
   parsing, chat template and tokenizer, loaded here from the model directory) and hashes them
   into the chain of full-block hashes the engine's prefix cache uses
   (``engine/prefix_summary.py``, the one definition of that hash);
2. counts, per replica, how many leading blocks of that chain the replica holds: what the
   replica last reported (``record_routing_stats``: its cached blocks' 32-bit hashes, every
   ``ROUTING_STATS_PERIOD_S``) plus the prompts this router sent it since (a report lags by up
   to a period, and a burst of requests sharing a new prefix would otherwise scatter);
3. if the longest match is on a replica whose in-flight requests exceed the least loaded
   replica's by at most ``imbalanced_threshold``, routes there; otherwise (no match, the load
   imbalanced, the replica full, no cache information yet) it does what Serve's default router
   does: the less loaded of two random replicas (power of two choices).

Not available with ``ingress: direct``: there Serve's HTTP proxy routes each request before
reading its body (a replica pulls the body from the proxy afterwards), so a router never sees
the prompt. The config refuses that combination.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

logger = logging.getLogger("ray.serve")

ROUTER_CLASS_PATH = "fastserve_ray.serve.prefix_router:PrefixAwareRouter"
# How often each replica reports its prefix cache. Serve's default (10 s) is too stale for a
# cache that turns over in seconds; the report is at most 32 KiB (engine/prefix_summary.py).
ROUTING_STATS_PERIOD_S = 1.0
GENERATE_METHODS = frozenset({"generate", "generate_stream"})  # LLMServer's generation entry points
_MAX_PENDING_CHAINS = 4096  # hash chains kept between choosing a replica and the replica accepting
_DEFAULT_MAX_MODEL_LEN = 1 << 16  # until a replica reports its own (only bounds text length checks)
# A new router loads the tokenizer (and imports the engine package for the hash) on a thread,
# ~2 s. Requests in that window wait for it, up to this long after the router started, rather
# than take the default route unrecorded (the first prompts of a conversation would scatter).
PROMPT_BUILDER_WAIT_S = 15.0


def uses_prefix_router() -> bool:
    """In a replica: whether its deployment routes with PrefixAwareRouter (whether anyone
    reads its routing stats). True when it cannot tell."""
    try:
        from ray import serve

        config = serve.get_replica_context()._deployment_config  # private; guarded below
        path = config.request_router_config.request_router_class
    except Exception:  # noqa: BLE001 - not in a replica, or Serve moved the field: report anyway
        return True
    return not isinstance(path, str) or path.replace(":", ".").endswith("prefix_router.PrefixAwareRouter")


def router_config(model_path: str, served_name: str, block_size: int, imbalanced_threshold: float
                  ) -> dict[str, Any]:
    """The deployment's ``request_router_config`` for prefix-aware routing (JSON-only kwargs)."""
    return {
        "request_router_class": ROUTER_CLASS_PATH,
        "request_router_kwargs": {"model_path": model_path, "served_name": served_name,
                                  "block_size": block_size, "imbalanced_threshold": imbalanced_threshold},
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
    }


class PrefixAwareRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Longest cached prefix when the load is balanced, else power of two choices.

    No FIFOMixin: with it, a replica chosen for one request may be handed to an older pending
    one, which would undo the choice (Ray's PrefixCacheAffinityRouter leaves it out too).
    """

    def initialize_state(self, model_path: str | None = None, served_name: str | None = None,
                         block_size: int = 16, imbalanced_threshold: float = 2.0,
                         min_match_blocks: int = 1, pending_ttl_s: float = 5.0 * ROUTING_STATS_PERIOD_S,
                         prompt_builder: Any = None) -> None:
        """Called by Serve with ``request_router_kwargs``.

        ``prompt_builder`` (tests) replaces the one loaded from ``model_path``; loading runs on a
        thread (a tokenizer, and an s3:// model's download). Generation requests arriving
        meanwhile wait for it, up to PROMPT_BUILDER_WAIT_S after start; later, or if loading
        failed, they take the default route.
        """
        self._block_size = block_size  # replaced by what the replicas report
        self._imbalanced_threshold = imbalanced_threshold
        self._min_match_blocks = min_match_blocks
        self._pending_ttl_s = pending_ttl_s
        self._prompts: Any = prompt_builder
        self._reported: dict[ReplicaID, frozenset[int]] = {}
        self._reported_raw: dict[ReplicaID, bytes] = {}
        # Prompts routed since the replica's last report: short hash -> when routed.
        self._recent: dict[ReplicaID, dict[int, float]] = collections.defaultdict(dict)
        self._chains: collections.OrderedDict[str, list[list[int]]] = collections.OrderedDict()
        self.decisions: collections.Counter[str] = collections.Counter()  # why each request went where
        self._loading = threading.Event()  # set when loading ended (done or failed)
        self._wait_until = time.monotonic() + PROMPT_BUILDER_WAIT_S
        if prompt_builder is not None or model_path is None:
            self._loading.set()
        else:
            threading.Thread(target=self._load_prompt_builder, args=(model_path, served_name or ""),
                             name="prefix-router-tokenizer", daemon=True).start()

    def _load_prompt_builder(self, model_path: str, served_name: str) -> None:
        try:
            from fastserve_ray.models.model_dir import TOKENIZER_FILE
            from fastserve_ray.models.model_store import local_model_dir
            from fastserve_ray.serve.server import PromptBuilder
            from fastserve_ray.tokenizer import Tokenizer

            path = local_model_dir(model_path) / TOKENIZER_FILE
            tokenizer = Tokenizer.load(path) if path.exists() else None  # token-id prompts still hash
            self._prompts = PromptBuilder(tokenizer, _DEFAULT_MAX_MODEL_LEN, served_name)
        except Exception:  # noqa: BLE001 - routing still works, without prefix affinity
            logger.exception("prefix-aware router: cannot load the tokenizer of %s; default routing only",
                             model_path)
        finally:
            self._loading.set()

    async def _wait_for_prompt_builder(self) -> None:
        """While a young router still loads its tokenizer, wait for it (bounded)."""
        while not self._loading.is_set() and time.monotonic() < self._wait_until:
            await asyncio.sleep(0.05)

    # -- what the replicas report ---------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's replica set (and their routing stats) changed: refresh the cached-block sets."""
        from fastserve_ray.engine.prefix_summary import decode_summary

        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for rid in [rid for rid in self._reported if rid not in live]:
            self._reported.pop(rid, None)
            self._reported_raw.pop(rid, None)
        for rid in [rid for rid in self._recent if rid not in live]:
            del self._recent[rid]
        for r in replicas:
            stats = r.routing_stats or {}
            summary = stats.get("prefix_cache")
            raw = summary.get("hashes") if isinstance(summary, dict) else None
            if raw is not None and raw == self._reported_raw.get(r.replica_id):
                continue  # unchanged report: no need to decode it again
            decoded = decode_summary(summary)
            if decoded is None:
                continue
            self._block_size, self._reported[r.replica_id] = decoded
            self._reported_raw[r.replica_id] = raw
            max_len = stats.get("max_model_len")
            if isinstance(max_len, int) and self._prompts is not None:
                self._prompts.max_model_len = max_len
            self._expire(r.replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Forget a dead replica's cache."""
        super().on_replica_actor_died(replica_id)
        self._reported.pop(replica_id, None)
        self._reported_raw.pop(replica_id, None)
        self._recent.pop(replica_id, None)

    def _expire(self, replica_id: ReplicaID) -> None:
        """Drop routed prompts old enough that the replica's reports include them (or their eviction)."""
        recent = self._recent.get(replica_id)
        if recent:
            cutoff = time.monotonic() - self._pending_ttl_s
            for h in [h for h, t in recent.items() if t < cutoff]:
                del recent[h]

    # -- the request's prompt ---------------------------------------------------------------------

    def _request_chains(self, pr: PendingRequest) -> list[list[int]] | None:
        """The block-hash chain of each prompt of a generation request; None when there is none
        to compute (another method, a bad request: the replica will answer it)."""
        key = pr.metadata.internal_request_id
        if key in self._chains:
            return self._chains[key]
        if self._prompts is None or pr.metadata.call_method not in GENERATE_METHODS or len(pr.args) < 2:
            return None
        kind, body = pr.args[0], pr.args[1]
        if kind not in ("completion", "chat") or not isinstance(body, dict):
            return None
        from fastserve_ray.engine.prefix_summary import prompt_block_hashes
        from fastserve_ray.serve.protocol import APIError

        try:
            prompts = self._prompts.prompt_token_ids(kind, body)
        except APIError:
            return None
        except Exception:  # noqa: BLE001 - never fail a request over a routing hint
            logger.debug("prefix-aware router: cannot build the prompt", exc_info=True)
            return None
        chains = [prompt_block_hashes(ids, self._block_size) for ids in prompts]
        self._chains[key] = chains
        while len(self._chains) > _MAX_PENDING_CHAINS:
            self._chains.popitem(last=False)
        return chains

    def matched_blocks(self, replica_id: ReplicaID, chains: list[list[int]]) -> int:
        """Leading blocks of the chains this replica holds: reported, or routed there since."""
        from fastserve_ray.engine.prefix_summary import short_hash

        reported = self._reported.get(replica_id, frozenset())
        recent = self._recent.get(replica_id, {})
        total = 0
        for chain in chains:
            for h in chain:
                s = short_hash(h)
                if s not in reported and s not in recent:
                    break
                total += 1
        return total

    # -- the choice -----------------------------------------------------------------------------

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """In-flight requests per replica: this router's cache, probing those it lacks."""
        lens: dict[ReplicaID, int] = {}
        missing = []
        for r in replicas:
            q = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if q is None:
                missing.append(r)
            else:
                lens[r.replica_id] = q
        if missing:
            for r, q in await self._probe_queue_lens(missing, 0):
                if q is not None:
                    lens[r.replica_id] = q
        return lens

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """The replica with the longest cached prefix first when the load allows, then (or
        else) the power-of-two choice: a full preferred replica falls through to it."""
        fallback = await PowerOfTwoChoicesRequestRouter.choose_replicas(
            self, candidate_replicas=candidate_replicas, pending_request=pending_request)
        if pending_request is None or not fallback or pending_request.metadata.multiplexed_model_id:
            return fallback
        if self._prompts is None and pending_request.metadata.call_method in GENERATE_METHODS:
            await self._wait_for_prompt_builder()
        chains = self._request_chains(pending_request)
        if not chains or not any(chains):
            self.decisions["default_no_prompt_info"] += 1
            return fallback
        matches = {r.replica_id: self.matched_blocks(r.replica_id, chains) for r in candidate_replicas}
        best = max(matches.values(), default=0)
        if best < self._min_match_blocks:
            self.decisions["default_no_match"] += 1
            return fallback
        lens = await self._queue_lens(candidate_replicas)
        if not lens:
            self.decisions["default_no_load_info"] += 1
            return fallback
        lowest = min(lens.values())
        preferred = [r for r in candidate_replicas if matches[r.replica_id] == best
                     and r.replica_id in lens and lens[r.replica_id] < r.max_ongoing_requests
                     and lens[r.replica_id] - lowest <= self._imbalanced_threshold]
        if not preferred:
            self.decisions["default_imbalanced"] += 1
            return fallback
        self.decisions["prefix"] += 1
        return [preferred, *fallback]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """The replica accepted the request: it will cache the prompt's blocks; remember that
        until its reports show it (or its eviction)."""
        chains = self._chains.pop(pending_request.metadata.internal_request_id, None)
        if not chains:
            return
        from fastserve_ray.engine.prefix_summary import short_hash

        now = time.monotonic()
        recent = self._recent[replica_id]
        for chain in chains:
            for h in chain:
                recent[short_hash(h)] = now
        if len(recent) > 4 * _MAX_PENDING_CHAINS:
            self._expire(replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Drop the chain of a request that ended without being routed (cancelled, rejected)."""
        self._chains.pop(internal_request_id, None)
