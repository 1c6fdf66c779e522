"""Which rows each worker trains on at each step: a deterministic function of (seed, step).

Every epoch is one seeded permutation of the training rows, cut into global
batches of ``global_batch_size`` rows; worker r of W takes the r-th contiguous
slice of each global batch. So the optimisation does not depend on the worker
count (1 worker x 2b rows == 2 workers x b rows), every row is seen once per
epoch, and resuming at step s replays exactly the data order that was lost.
"""

from __future__ import annotations

import numpy as np


class BatchPlan:
    """Row indices for (step, rank, world_size) over ``num_rows`` rows."""

    def __init__(self, num_rows: int, global_batch_size: int, seed: int) -> None:
        if num_rows < global_batch_size:
            raise ValueError(
                f"the training split has {num_rows} rows, fewer than one global batch "
                f"({global_batch_size}); prepare more data or lower global_batch_size"
            )
        self.num_rows, self.global_batch_size, self.seed = num_rows, global_batch_size, seed
        self.steps_per_epoch = num_rows // global_batch_size  # the remainder rotates each epoch
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._perm

    def rows(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """Indices of the rows worker ``rank`` trains on at optimizer step ``step``."""
        epoch, index = divmod(step, self.steps_per_epoch)
        per_worker = self.global_batch_size // world_size
        start = index * self.global_batch_size + rank * per_worker
        return self._permutation(epoch)[start : start + per_worker]
