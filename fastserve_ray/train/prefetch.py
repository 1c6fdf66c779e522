"""Read the next steps' rows on a background thread, so storage reads overlap compute.

The reads release the GIL (pyarrow file I/O), so the training thread keeps
computing while the following batches arrive. At most ``depth`` batches are
held, which bounds the memory this adds to ``depth`` local batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np


class Prefetcher:
    """Yields ``load(step)`` for step = start, start+1, ... < stop, computed ``depth`` steps ahead."""

    def __init__(self, load: Callable[[int], np.ndarray], start: int, stop: int, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(load, start, stop), daemon=True,
                                        name="row-prefetch")
        self._thread.start()

    def _run(self, load: Callable[[int], np.ndarray], start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                item = (step, load(step), None)
            except BaseException as e:  # handed to the training thread, which raises it
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def get(self, step: int) -> np.ndarray:
        """The rows for ``step``; steps must be asked for in order."""
        got, rows, error = self._queue.get()
        if error is not None:
            raise error
        if got != step:
            raise RuntimeError(f"prefetcher out of order: asked for step {step}, has step {got}")
        return rows

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue) and wait for it."""
        self._stop.set()
        self._thread.join(timeout=10)
