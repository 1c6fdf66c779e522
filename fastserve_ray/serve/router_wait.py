"""A bound on how long a request waits at the router for a replica of its model.

With ``min_replicas: 0`` the first request after idling finds no replica: Serve's router holds
it while the autoscaler starts one (a cold start: process, model download and load, warm-up).
The request should wait, not fail; but not forever either. Router mode waits at most the
model's ``max_router_wait_s`` for Serve to assign the request to a replica (the same bound holds
when every replica is full and requests queue), then answers 503 with Retry-After.

Serve's public handle API has no assignment timeout; DeploymentResponse resolves its replica
in ``_fetch_future_result_async`` (Ray 2.60, pinned), which is what is awaited here.
"""

from __future__ import annotations

import asyncio
from typing import Any


class NoReplicaInTime(Exception):
    """No replica took the request within the wait limit."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"no replica became available within {waited_s:g} s")
        self.waited_s = waited_s


async def wait_for_replica(response: Any, limit_s: float | None) -> None:
    """Return once Serve assigned ``response`` (a DeploymentResponse[Generator]) to a replica.

    After ``limit_s`` the request is cancelled (it never reached a replica, so nothing ran) and
    NoReplicaInTime raised. Errors of the assignment itself (backpressure) surface as usual.
    """
    fetch = getattr(response, "_fetch_future_result_async", None)
    if limit_s is None or fetch is None:
        return
    try:
        await asyncio.wait_for(asyncio.shield(fetch()), limit_s)
    except asyncio.TimeoutError:
        response.cancel()
        raise NoReplicaInTime(limit_s) from None
