"""Build a scheduler by policy name; kept apart so that no policy module imports another."""

from __future__ import annotations

from typing import Any

from fastserve_ray.engine.block_manager import KVCacheManager
from fastserve_ray.engine.engine_config import SCHEDULER_POLICIES
from fastserve_ray.engine.mlfq import MLFQScheduler
from fastserve_ray.engine.scheduler import FCFSScheduler, Scheduler
from fastserve_ray.errors import ConfigError


def create_scheduler(policy: str, block_manager: KVCacheManager, **kwargs: Any) -> Scheduler:
    """Build the scheduler named ``policy`` ("fcfs" or "mlfq") with its keyword arguments."""
    classes: dict[str, type[Scheduler]] = {"fcfs": FCFSScheduler, "mlfq": MLFQScheduler}
    if policy not in classes:
        raise ConfigError(f"unknown scheduler policy {policy!r}; choose one of {SCHEDULER_POLICIES}")
    return classes[policy](block_manager, **kwargs)
