"""The pipeline's stages called one after another in this process (the benchmark's baseline)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastserve_ray.compress.pipeline import CompressOptions, CompressResult, run_pipeline
from fastserve_ray.compress.recipe import Recipe


class LocalExecutor:
    """Runs each submitted task immediately; handles are the values themselves."""

    def __init__(self, quiet: bool = False) -> None:
        self.done: Counter[str] = Counter()
        self.quiet = quiet

    parallelism = 1  # one process: rows in one chunk, and torch's own threads inside each call

    def submit(self, stage: str, fn: Callable[..., Any], *args: Any, num_returns: int = 1,
               pin_local: bool = False) -> Any:
        result = fn(*args)
        self.done[stage] += 1
        if not self.quiet:
            print(f"[compress] {stage}: {self.done[stage]} done", flush=True)
        return result

    def get(self, handle: Any) -> Any:
        return handle

    def wait_all(self) -> None:
        return None


def run_serial(model_dir: str | Path, out_dir: str | Path, recipe: Recipe, data_dir: str | Path | None = None,
               options: CompressOptions | None = None, quiet: bool = False) -> CompressResult:
    """Compress ``model_dir`` with ``recipe`` into ``out_dir`` without Ray."""
    return run_pipeline(LocalExecutor(quiet), model_dir, out_dir, recipe, data_dir, options)
