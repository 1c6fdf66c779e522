"""Writing a benchmark's result: JSON to a file and a fixed-width table to the console."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_json(report: dict[str, Any], out: Path | None, tag: str) -> None:
    """Write ``report`` as indented JSON to ``out`` (if given), creating its folder; atomically:
    a run that fails while writing leaves the previous file, never half of a new one."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"[bench {tag}] wrote {out}")


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns sized to their widest cell; the first column left-aligned, the rest right."""
    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print()
    for n, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        print("  ".join(cells))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()


class Progress:
    """Progress lines with the elapsed wall time, and the wall time of each named part."""

    def __init__(self, tag: str = "engine") -> None:
        self.tag = tag
        self.t0 = time.perf_counter()
        self.parts: dict[str, float] = {}

    @property
    def elapsed(self) -> float:
        """Seconds since the benchmark started."""
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        """Print one progress line (flushed: the run is long and often piped)."""
        print(f"[bench {self.tag} {self.elapsed:6.0f}s] {msg}", flush=True)

    def add(self, part: str, seconds: float) -> None:
        """Charge ``seconds`` to ``part``."""
        self.parts[part] = self.parts.get(part, 0.0) + seconds
