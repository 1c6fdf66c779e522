"""Writing a benchmark's result: JSON to a file and a fixed-width table to the console."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_json(report: dict[str, Any], out: Path | None, tag: str) -> None:
    """Write ``report`` as indented JSON to ``out`` (if given), creating its folder."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
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
