"""Writing a whole output directory atomically: readers see the old one or the finished new one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``out_dir``, on any failure it is deleted.

    The staging directory sits beside ``out_dir`` (same filesystem, so the final rename is atomic)
    inside a private work directory; it is created with normal permissions, so the result is not
    left readable by its owner only, as a directory made by ``mkdtemp`` itself would be.
    """
    out_dir = Path(out_dir)
    parent = out_dir.absolute().parent  # absolute: "." or "runs/" have a usable parent and name
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.absolute().name}.tmp-", dir=parent))
    try:
        stage = work / "out"
        stage.mkdir()
        yield stage
        if out_dir.exists():
            # A rename cannot replace a non-empty directory: move the old one aside (into the work
            # directory, deleted below) so that the gap with no out_dir is two renames long.
            os.replace(out_dir, work / "old")
        os.replace(stage, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
