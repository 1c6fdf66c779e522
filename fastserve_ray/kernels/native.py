"""Builds and loads the module of native CPU kernels (``*.cpp`` beside this file).

``native_module()`` returns the compiled module, or None where it is not available; the
kernels' own wrappers (``paged_decode.py``, ``small_linear.py``) take their functions from it.

The compiled module is kept on disk, once per machine, under
``$TORCH_EXTENSIONS_DIR/fastserve`` (default ``~/.cache/torch_extensions/fastserve``) as
``fastserve_cpu_kernels_<key>.so``. The key digests the sources, the compiler flags, the
PyTorch and Python versions and this CPU's feature flags: the build targets ``-march=native``,
and a home directory shared across a cluster's nodes must not hand one CPU's binary to another.

Why not plain ``torch.utils.cpp_extension.load``: it takes a lock *file* on every call, even
when nothing needs building, and a process killed while holding it (a Ray replica scaled
down, a test timed out, a job cancelled) leaves the file behind, so every later engine start
on that machine waits for it forever. Here a ready module is imported with no lock at all; a
build runs under ``flock`` (which the kernel releases when its holder dies), in a child
process with a time limit, into a private directory, and is published with an atomic rename.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from fastserve_ray import envs
from fastserve_ray.capability import capability

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("bindings.cpp", "paged_decode_cpu.cpp", "small_linear_cpu.cpp",
                        "norm_rope_cpu.cpp", "decode_layer_cpu.cpp")]
HEADERS = [Path(__file__).with_name("native_kernels.h")]  # included by the sources: part of the key
ENV_SWITCH = envs.NATIVE_KERNELS
# -ffast-math lets the compiler vectorize exp() and reassociate the fp32 sums; it is given
# to the compile step only (the link step would add crtfastmath, flushing denormals
# process-wide).
# The target (-march) comes from the capability object: this CPU, or a forced lower level.
BASE_CFLAGS = ["-O3", "-fopenmp", "-ffast-math"]
LDFLAGS = ["-fopenmp"]
# A build takes 25-35 s on 2 cores (one translation unit); one not finished in this long is hung.
BUILD_TIMEOUT_S = 900.0

# The child process that compiles: cpp_extension.load also imports the result, which proves
# the module loads before it is published.
_COMPILE_SCRIPT = """
import json, sys
from torch.utils.cpp_extension import load
a = json.loads(sys.argv[1])
load(name=a["name"], sources=a["sources"], build_directory=a["build_dir"],
     extra_cflags=a["cflags"], extra_ldflags=a["ldflags"], verbose=False)
"""


# Seconds between the "still building" lines of a build.
PROGRESS_EVERY_S = 15.0


def native_kernels_enabled() -> bool:
    """False when ``FASTSERVE_NATIVE_KERNELS`` is set to 0/false/no/off."""
    return capability().native_kernels_wanted


def cflags() -> list[str]:
    """The compile flags: BASE_CFLAGS and the capability's -march."""
    return BASE_CFLAGS + capability().march_flags()


def _cpu_flags() -> str:
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags += line
                break
    except OSError:
        pass
    return flags


def module_name() -> str:
    """The compiled module's name: ``fastserve_cpu_kernels_`` + a digest of what shapes it."""
    import torch

    h = hashlib.sha256()
    for source in SOURCES + HEADERS:
        h.update(source.read_bytes())
    for part in (cflags(), LDFLAGS, torch.__version__, sys.version, _cpu_flags()):
        h.update(json.dumps(part).encode())
    return f"fastserve_cpu_kernels_{h.hexdigest()[:16]}"


def cache_dir() -> Path:
    """Where built kernels are kept: ``$TORCH_EXTENSIONS_DIR/fastserve``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "fastserve"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # flock, not a lock file's existence: the kernel drops it when the holder exits or dies.
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _unity_source(build_dir: Path) -> Path:
    """One translation unit that includes every source: the compiler parses torch/extension.h
    (most of a build's time) once instead of once per file: 31 s instead of 66 s on 2 cores. The
    sources therefore share one namespace: file-local helpers need distinct names (a clash is a
    compile error, never a silent mix-up)."""
    unity = build_dir / "fastserve_cpu_kernels_unity.cpp"
    unity.write_text("".join(f'#include "{s}"\n' for s in SOURCES))
    return unity


def _compile(name: str, build_dir: Path) -> Path:
    """Compile ``name`` into ``build_dir`` in a child process; return the built ``.so``."""
    args = {"name": name, "sources": [str(_unity_source(build_dir))], "build_dir": str(build_dir),
            "cflags": cflags(), "ldflags": LDFLAGS}
    # Its own session, so that a hung build's compiler processes are killed with it.
    child = subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    start = time.monotonic()
    while True:
        try:
            remaining = BUILD_TIMEOUT_S - (time.monotonic() - start)
            out, err = child.communicate(timeout=max(0.1, min(PROGRESS_EVERY_S, remaining)))
            break
        except subprocess.TimeoutExpired as e:
            waited = time.monotonic() - start
            if waited >= BUILD_TIMEOUT_S:
                os.killpg(child.pid, signal.SIGKILL)
                child.communicate()
                raise RuntimeError(f"the build did not finish in {BUILD_TIMEOUT_S:g} s") from e
            log.warning("... the native kernel build is still running (%.0f s)", waited)
    built = build_dir / f"{name}.so"
    if child.returncode != 0 or not built.is_file():
        lines = [ln for ln in (err + out).splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"the compiler exited {child.returncode}")
    return built


def _build(name: str, target: Path) -> None:
    """Build ``name`` and publish it at ``target``; the caller holds the build lock."""
    root = target.parent
    for stale in root.glob(f".{name}-build-*"):  # left by a builder that was killed
        shutil.rmtree(stale, ignore_errors=True)
    log.warning("building the native CPU kernels (once per machine, about 30 s) into %s", root)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-build-") as tmp:
        # tmp is inside root, one file system: readers see the whole file or none.
        os.replace(_compile(name, Path(tmp)), target)
    log.warning("built the native CPU kernels in %.0f s", time.monotonic() - start)


def _import(name: str, path: Path) -> ModuleType:
    import torch  # noqa: F401 - the extension links against libtorch, which must be loaded first

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NoCompilerError(RuntimeError):
    """The kernels are not built for this machine and there is no C++ compiler to build them."""


def built_path() -> Path:
    """Where this machine's build of the kernels is (or would be) kept."""
    return cache_dir() / f"{module_name()}.so"


def load_or_build() -> ModuleType:
    """The compiled module, building it first if this machine has none (raises on failure)."""
    name = module_name()
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}.so"
    if not target.is_file() and capability().compiler is None:
        raise NoCompilerError("no C++ compiler ($CXX or c++) to build the native CPU kernels")
    if not target.is_file():
        with _exclusive(root / f"{name}.lock"):
            if not target.is_file():  # another process may have built it while we waited
                _build(name, target)
    return _import(name, target)


@functools.cache
def native_module() -> ModuleType | None:
    """The kernels' module, loaded once per process (built once per machine).

    None if disabled or if the build fails, in which case the failure is logged once and the
    callers run their PyTorch paths instead.
    """
    if not native_kernels_enabled():
        return None
    try:
        return load_or_build()
    except NoCompilerError as e:  # an expected set-up, not a failure: one line, then on
        log.warning("%s: the PyTorch paths run instead (install g++ and rerun scripts/bootstrap.sh "
                    "for the fast CPU kernels)", e)
        return None
    except Exception as e:  # noqa: BLE001 - no compiler, headers or OpenMP: fall back, loudly
        log.warning("the native CPU kernels could not be built (%s: %s); the PyTorch paths run "
                    "instead", type(e).__name__, str(e).splitlines()[0][:200])
        return None
