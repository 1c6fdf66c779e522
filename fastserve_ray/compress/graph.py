"""The compression pipeline as a Ray task graph.

Every stage is a Ray task; each task's arguments are the ObjectRefs of the tasks it depends on,
so Ray starts a task as soon as its inputs exist and large tensors move through the object
store, never through this driver. Tasks are retried (``max_retries``) when their worker dies;
their bodies are deterministic, so a retried run writes byte-identical files. The final write
runs on the driver's node when the output is a local path (taking no CPU, so a head with
num-cpus 0 can run it) and anywhere when it is an object-store URI.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fastserve_ray.compress.pipeline import CompressOptions, CompressResult, run_pipeline
from fastserve_ray.compress.recipe import Recipe
from fastserve_ray.errors import FastServeError

MAX_RETRIES = 3
PROGRESS_INTERVAL_S = 2.0


class RayExecutor:
    """Submits task functions as Ray tasks and reports per-stage progress while waiting."""

    def __init__(self, max_retries: int = MAX_RETRIES) -> None:
        self.max_retries = max_retries
        self._remote: dict[Callable[..., Any], Any] = {}
        self._pending: dict[Any, str] = {}  # ObjectRef -> stage
        self.submitted: Counter[str] = Counter()

    @property
    def parallelism(self) -> int:
        """The cluster's CPUs: each task takes one, so this many row chunks can run at once."""
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def submit(self, stage: str, fn: Callable[..., Any], *args: Any, num_returns: int = 1,
               pin_local: bool = False) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = ray.remote(fn)
        options: dict[str, Any] = {"num_cpus": 1, "num_returns": num_returns, "max_retries": self.max_retries,
                                   "name": f"compress.{stage}"}
        if pin_local:
            # Pinned tasks write to the driver's disk: I/O, not compute, so no CPU slot is taken,
            # which also lets them run on a head started with num-cpus 0 (KubeRay's usual head).
            options["num_cpus"] = 0
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)
        refs = remote.options(**options).remote(*args)
        first = refs[0] if num_returns > 1 else refs
        self._pending[first] = stage
        self.submitted[stage] += 1
        return refs

    def get(self, handle: Any) -> Any:
        return _get(handle)

    def wait_all(self) -> None:
        """Block until every submitted task finished, printing stage progress; re-raise a task's error."""
        done: Counter[str] = Counter()
        pending = list(self._pending)
        last_print = 0.0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=PROGRESS_INTERVAL_S)
            for ref in ready:
                done[self._pending[ref]] += 1
                _get(ref)  # surfaces a failed task now, with its own error
            now = time.monotonic()
            if ready and (now - last_print >= PROGRESS_INTERVAL_S or not pending):
                last_print = now
                line = ", ".join(f"{s} {done[s]}/{n}" for s, n in self.submitted.items())
                print(f"[compress] {line}", flush=True)


def _get(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        if isinstance(cause, (FastServeError, ValueError)):
            raise cause from None
        raise


def run_graph(model_dir: str | Path, out_dir: str | Path, recipe: Recipe, data_dir: str | Path | None = None,
              options: CompressOptions | None = None, max_retries: int = MAX_RETRIES) -> CompressResult:
    """Compress ``model_dir`` with ``recipe`` into ``out_dir`` as a Ray task graph (Ray must be up).

    ``options.fault = (layer name, marker file)`` kills that layer's task once (tests of retries).
    """
    return run_pipeline(RayExecutor(max_retries), model_dir, out_dir, recipe, data_dir, options)
