"""Where the training loop runs: inside Ray Train (RaySession) or a plain process (LocalSession).

The loop in loop.py asks its session for rank, world size, device, the latest
checkpoint and a way to report; everything else is the same code. The plain
session is what the benchmark's no-Ray baseline runs, so both sides of that
comparison execute the project's own training step, reporting and checkpointing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

SaveFn = Callable[[Path], None]


class RaySession:
    """The loop as a Ray Train worker: DDP via prepare_model, checkpoints through ray.train.report."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_world = ctx.get_local_world_size()
        self.num_nodes = max(1, self.world // max(1, self.local_world))

    def device(self) -> torch.device:
        """The device Ray Train assigned to this worker."""
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to the device; wrap in DDP when there is more than one worker."""
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """The directory of the checkpoint to resume from, or None on a fresh start."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], save: SaveFn | None = None) -> None:
        """Report metrics; with ``save``, rank 0 writes a checkpoint and all wait until it is committed."""
        import ray.train

        if save is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                save(Path(tmp))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        # A worker dying right after a report would otherwise lose the checkpoint, and with it
        # more than checkpoint_interval steps.
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


class LocalSession:
    """The loop in this process alone (rank 0 of 1): checkpoints in ``ckpt_root``/latest."""

    def __init__(self, ckpt_root: Path, device: torch.device | str | None = None) -> None:
        self.rank, self.world, self.local_world, self.num_nodes = 0, 1, 1, 1
        self.ckpt_root = Path(ckpt_root)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.reports: list[dict[str, Any]] = []

    def device(self) -> torch.device:
        return self._device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self._device)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        latest = self.ckpt_root / "latest"
        yield latest if latest.is_dir() else None

    def report(self, metrics: dict[str, Any], save: SaveFn | None = None) -> None:
        self.reports.append(metrics)
        if save is None:
            return
        # Written beside, then swapped in: a crash never leaves a half-written "latest".
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=self.ckpt_root))
        save(tmp)
        latest, old = self.ckpt_root / "latest", self.ckpt_root / ".old"
        if latest.exists():
            os.replace(latest, old)
        os.replace(tmp, latest)
        shutil.rmtree(old, ignore_errors=True)
