"""Model directories on object storage (``s3://``, ``gs://``, ... anything pyarrow.fs reaches).

Reading: a remote model directory is used through a copy in this node's cache. The remote
manifest.json is read first; its sha256 names the cache entry, so an unchanged artifact is
downloaded once per node and shared by every process there (replicas, compression tasks), while
a republished one is a new entry. Each file is hashed as it streams in and checked against the
manifest before the entry is renamed into place: a corrupted or truncated object is a
ModelDirError naming the object, and nothing half-downloaded is ever loaded. Several processes
asking at once wait on one file lock; one downloads, the others reuse its copy.

Writing: a model directory is written locally (atomically, as always) and then uploaded with
manifest.json last, so a reader never finds a manifest whose files are not all there yet.

The cache root is ``FASTSERVE_MODEL_CACHE`` or ``~/.cache/fastserve-ray/models``; on a cluster
point it at each node's local disk. Every download appends a line to ``downloads.jsonl`` there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastserve_ray import storage
from fastserve_ray.errors import DataError, ModelDirError

CACHE_ENV = "FASTSERVE_MODEL_CACHE"
DOWNLOAD_LOG = "downloads.jsonl"
MANIFEST_FILE = "manifest.json"
CHUNK = 1 << 22
PROGRESS_INTERVAL_S = 5.0


def cache_root() -> Path:
    """Where this node keeps downloaded model directories."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastserve-ray" / "models")


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is an object-store URI (not a local or mounted path)."""
    return storage.is_uri(location)


def read_remote_file(location: str, name: str) -> bytes:
    """One small file of a remote model directory; ModelDirError when it is not there."""
    uri = storage.join(location, name)
    try:
        if not storage.is_file(uri):
            raise ModelDirError(f"{uri} is missing: {location} is not a fastserve-ray model directory "
                                "(or it is still being uploaded)")
        return storage.read_bytes(uri)
    except (OSError, DataError) as e:
        raise ModelDirError(f"cannot read {uri}: {e}") from None


def local_model_dir(location: str | Path, cache: Path | None = None) -> Path:
    """A local directory holding the model at ``location``: the path itself, or this node's verified copy."""
    if not is_remote(location):
        return Path(location)
    location = str(location).rstrip("/")
    raw = read_remote_file(location, MANIFEST_FILE)
    files = _manifest_files(raw, location)
    root = cache or cache_root()
    entry = root / f"{_safe_name(location)}-{hashlib.sha256(raw).hexdigest()[:16]}"
    if (entry / MANIFEST_FILE).is_file():  # entries exist only complete (renamed into place)
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{entry.name}.lock"):
        if (entry / MANIFEST_FILE).is_file():  # another process finished it while we waited
            return entry
        _download(location, raw, files, entry, root)
    return entry


def _manifest_files(raw: bytes, location: str) -> dict[str, dict[str, Any]]:
    try:
        files = json.loads(raw)["files"]
        for name, meta in files.items():
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"file name {name!r} is not a plain name")
            int(meta["size"]), str(meta["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelDirError(f"{location}/{MANIFEST_FILE} is not a valid manifest ({e})") from None
    return files


def _safe_name(location: str) -> str:
    name = location.rsplit("/", 1)[-1] or "model"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:64]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(location: str, raw: bytes, files: dict[str, dict[str, Any]], entry: Path, root: Path) -> None:
    total = sum(int(m["size"]) for m in files.values())
    print(f"[model-cache] downloading {location} ({len(files)} files, {total / 1e6:.1f} MB) -> {entry}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = root / f".{entry.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        done = 0
        for name, meta in sorted(files.items()):
            done += _fetch_file(storage.join(location, name), tmp / name, meta, done, total, start)
        (tmp / MANIFEST_FILE).write_bytes(raw)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - start
    print(f"[model-cache] {location}: {total / 1e6:.1f} MB in {wall:.1f}s", file=sys.stderr, flush=True)
    record = {"location": location, "entry": entry.name, "bytes": total, "seconds": round(wall, 3),
              "pid": os.getpid(), "time": time.time()}
    with open(root / DOWNLOAD_LOG, "a") as log:
        log.write(json.dumps(record) + "\n")


def _fetch_file(uri: str, dest: Path, meta: dict[str, Any], done: int, total: int, start: float) -> int:
    """Stream one object to ``dest``, hashing as it goes; ModelDirError unless it matches ``meta``."""
    digest, size, last = hashlib.sha256(), 0, time.perf_counter()
    try:
        fs, inner = storage.resolve(uri)
        with fs.open_input_stream(inner) as src, open(dest, "wb") as out:
            while block := src.read(CHUNK):
                digest.update(block)
                out.write(block)
                size += len(block)
                if time.perf_counter() - last >= PROGRESS_INTERVAL_S:
                    last = time.perf_counter()
                    print(f"[model-cache] {(done + size) / 1e6:.0f}/{total / 1e6:.0f} MB "
                          f"({last - start:.0f}s)", file=sys.stderr, flush=True)
    except FileNotFoundError:
        raise ModelDirError(f"{uri} is listed in {MANIFEST_FILE} but missing") from None
    except (OSError, DataError) as e:
        raise ModelDirError(f"cannot download {uri}: {e}") from None
    if size != int(meta["size"]):
        raise ModelDirError(f"{uri} has {size} bytes, the manifest says {meta['size']}: the object was "
                            "truncated or altered (nothing was cached)")
    if digest.hexdigest() != meta["sha256"]:
        raise ModelDirError(f"{uri} does not match its sha256 in {MANIFEST_FILE}: the object was altered "
                            "(nothing was cached)")
    return size


def check_output_location(location: str | Path, overwrite: bool) -> None:
    """ModelDirError when ``location`` already holds something and ``overwrite`` is not set."""
    if not overwrite and storage.is_nonempty(location):
        raise ModelDirError(f"{location} already exists and is not empty (pass --overwrite)")


@contextlib.contextmanager
def model_output(location: str | Path) -> Iterator[Path]:
    """A local path to write the model directory for ``location`` into; remote ones are uploaded after.

    Local: ``location`` itself (its writers are atomic). Remote: a temporary directory, uploaded
    with the manifest last when the body succeeds, and deleted either way.
    """
    try:
        with storage.staged_output(location, last=MANIFEST_FILE) as local:
            yield local
    except (OSError, DataError) as e:
        raise ModelDirError(f"cannot write {location}: {e}") from None
