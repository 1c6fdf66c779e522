"""prepare_data streams: peak memory does not grow with corpus size.

Each run is a fresh subprocess that reports its own peak RSS (VmHWM). With corpora
of S and 4S bytes, the 4S run's peak must stay below the S run's peak plus 40% of
the extra 3S bytes (12 MB here). Checked by hand: keeping the corpus text alive adds
~35 MB, keeping all token rows (~0.22 int32 tokens per byte) ~30 MB, so either fails;
the streaming pipeline grows by 2-5 MB. Most of the ~180 MB peak is the interpreter
and the pyarrow/tokenizers libraries and one encode batch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastserve_ray
from fastserve_ray.tokenizer import train_tokenizer

S_BYTES = 10_000_000
ROWS_PER_SHARD = 512
SEQ_LEN = 64
WORDS = (
    "the of and to in is was for on that with as by at from model data token serve "
    "train network compress quantize ray cluster shard tensor batch"
)

_CHILD = """
import json, resource, sys
from fastserve_ray.data import prepare_data
out, inp, tok = sys.argv[1:4]
m = prepare_data(out, [inp], tokenizer_path=tok, seq_len=int(sys.argv[4]),
                 rows_per_shard=int(sys.argv[5]), progress=False)
try:
    # VmHWM restarts at exec; ru_maxrss would still hold the forking parent's (pytest's) peak.
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    peak_bytes = int(hwm.split()[1]) * 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
print(json.dumps({"peak_bytes": peak_bytes,
                  "splits": {k: [v.num_rows, len(v.shards)] for k, v in m.splits.items()}}))
"""


def _write_corpus(path: Path, num_bytes: int, seed: int) -> None:
    """Random lines of words from a fixed list, written in chunks (never held whole)."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS.split())
    # A pool of random ~100 KB chunks, drawn at random: fast to write, still varied text.
    pool = [
        "\n".join(" ".join(line) for line in rng.choice(words, size=(1500, 12))) + "\n"
        for _ in range(32)
    ]
    written = 0
    with open(path, "w") as f:
        while written < num_bytes:
            chunk = pool[rng.integers(len(pool))]
            f.write(chunk)
            written += len(chunk)


def _run_prepare(out: Path, inp: Path, tokenizer_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(fastserve_ray.__file__).parents[1]))
    args = [str(out), str(inp), str(tokenizer_path), str(SEQ_LEN), str(ROWS_PER_SHARD)]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_corpus(tmp_path: Path) -> None:
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    _write_corpus(small, S_BYTES, seed=1)
    _write_corpus(large, 4 * S_BYTES, seed=2)
    # Pre-trained, so BPE training time does not dominate; trained on this very text so
    # most words are one token and encoding is quick.
    with open(small) as f:
        sample = f.read(200_000)
    tokenizer_path = train_tokenizer([sample], 512).save(tmp_path / "tokenizer.json")
    extra = large.stat().st_size - small.stat().st_size

    runs = {}
    for name, inp in (("small", small), ("large", large)):
        runs[name] = _run_prepare(tmp_path / f"out_{name}", inp, tokenizer_path)
        for rows, shards in runs[name]["splits"].values():
            assert shards == math.ceil(rows / ROWS_PER_SHARD)

    small_rows = runs["small"]["splits"]["train"][0]
    large_rows = runs["large"]["splits"]["train"][0]
    assert 3.5 < large_rows / small_rows < 4.5  # the large run really did 4x the work
    growth = runs["large"]["peak_bytes"] - runs["small"]["peak_bytes"]
    assert growth < 0.4 * extra, (
        f"peak RSS grew by {growth / 1e6:.1f} MB for {extra / 1e6:.1f} MB more input "
        f"(small run peak {runs['small']['peak_bytes'] / 1e6:.0f} MB)"
    )
