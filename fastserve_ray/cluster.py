"""Connecting to Ray: join the cluster a job was submitted to, or start a private local one."""

from __future__ import annotations

import os

import ray


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS, as under `ray job submit`), else start a new local Ray.

    A plain ``ray.init()`` would silently attach to whatever `ray start` cluster last ran on this
    machine; starting a private one (``address="local"``) keeps laptop runs and tests isolated.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # 2-core laptops and CI: give Ray a few logical CPUs so workers and Ray Data fit together.
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1))
