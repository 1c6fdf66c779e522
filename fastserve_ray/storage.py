"""Local paths and object-store URIs (``s3://``, ``gs://``, ...) behind one small API, via pyarrow.fs.

Data directories, Ray Train's ``storage_path`` and run outputs may live on a
local/NFS path or in an object store; every reader and writer in the project
goes through these helpers, so one code path serves both. S3 endpoints and
credentials come from the usual AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), exactly as Ray Train resolves its own storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from fastserve_ray.errors import DataError


def is_uri(path: str | Path) -> bool:
    """True for ``scheme://...`` locations other than ``file://``."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(str(path).removeprefix("file://")).absolute())
    try:
        fs, inner = pafs.FileSystem.from_uri(str(path))
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot open storage location {path}: {e}") from None
    return fs, inner.rstrip("/")


def join(base: str | Path, *parts: str) -> str:
    """``base``/``parts`` for a local path or a URI (no normalisation of the scheme)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base).joinpath(*parts))


def exists(path: str | Path) -> bool:
    """Whether a file or directory exists at ``path``."""
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_file(path: str | Path) -> bool:
    """Whether a regular file exists at ``path``."""
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def read_bytes(path: str | Path) -> bytes:
    """The whole (small) file at ``path``."""
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file at ``path``, streamed in ``chunk``-byte reads (bounded memory)."""
    fs, inner = resolve(path)
    digest = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_writable(path: str | Path, what: str) -> None:
    """ConfigError naming ``what`` unless a file can be created (and removed) under ``path``."""
    from fastserve_ray.errors import ConfigError

    try:
        fs, inner = resolve(path)
        fs.create_dir(inner, recursive=True)
        probe = f"{inner}/.write-test-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except (OSError, DataError) as e:
        raise ConfigError(f"{what} {path} is not writable: {getattr(e, 'strerror', None) or e}") from None


def write_text(path: str | Path, text: str) -> None:
    """Write a small text file (a marker, a manifest) at ``path``."""
    fs, inner = resolve(path)
    parent = inner.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file whole: locally through a renamed temporary, on object stores one PUT."""
    if is_uri(path):
        write_text(path, text)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_nonempty(path: str | Path) -> bool:
    """Whether ``path`` is a file or a directory with something in it (False when absent)."""
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return False
    if info.type == pafs.FileType.File:
        return True
    return bool(fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)))


@contextlib.contextmanager
def staged_output(dest: str | Path, last: str | None = None) -> Iterator[Path]:
    """A local directory path to write the output for ``dest`` into.

    Local: ``dest`` itself (the writer makes it atomic). URI: a path in a temporary directory,
    uploaded with publish_dir (``last`` uploaded last) when the body succeeds, deleted either way.
    """
    if not is_uri(dest):
        yield Path(dest)
        return
    with tempfile.TemporaryDirectory(prefix="fastserve-upload-") as tmp:
        local = Path(tmp) / "out"
        yield local
        publish_dir(local, dest, last=last)


def publish_dir(local_dir: Path, dest: str | Path, last: str | None = None) -> None:
    """Put a finished local directory at ``dest``, replacing what is there.

    Local: a rename from a sibling temporary, so readers never see half a directory.
    Object stores have no rename: ``last`` (a manifest, say) is deleted first and uploaded after
    every other file, so a reader that waits for it never sees a half-uploaded directory.
    """
    if not is_uri(dest):
        dest = Path(dest)
        if local_dir.resolve() == dest.resolve():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        shutil.copytree(local_dir, tmp)
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
        return
    fs, inner = resolve(dest)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        if last is not None and fs.get_file_info(f"{inner}/{last}").type == pafs.FileType.File:
            fs.delete_file(f"{inner}/{last}")
        fs.delete_dir_contents(inner, missing_dir_ok=True)
    fs.create_dir(inner, recursive=True)
    local_fs = pafs.LocalFileSystem()
    for path in sorted(Path(local_dir).rglob("*"), key=lambda p: (p.name == last, str(p))):
        if path.is_file():
            pafs.copy_files(str(path), f"{inner}/{path.relative_to(local_dir).as_posix()}",
                            source_filesystem=local_fs, destination_filesystem=fs)
