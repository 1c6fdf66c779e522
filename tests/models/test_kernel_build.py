"""Building the native kernel survives crashes and races: no engine start may wait forever.

These build from an empty cache directory, so they exercise the cold path that a machine meets
once (CI's cache is usually warm). The race test builds a one-function module through the same
machinery (locks, private build directory, atomic publish), which is what it is about; the real
kernels' cold build is what the set-up step does on every fresh machine, and the forced-ISA run
(tests/test_cpu_plans.py) does again for its own -march.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from fastserve_ray.kernels import native
from fastserve_ray.kernels.paged_decode import paged_decode_kernel

_CALL = ("import logging, sys; logging.basicConfig(level=logging.WARNING); "
         "from pathlib import Path; from fastserve_ray.kernels import native; "
         "native.SOURCES, native.HEADERS = [Path(sys.argv[1])], []; "
         "m = native.native_module(); sys.exit(0 if m is not None and m.one() == 1 else 3)")
# pybind11 only (no torch headers): a module that compiles in seconds.
_TINY_SOURCE = """#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("one", []() { return 1; }); }
"""


def _hold_lock_then_die(lock_path) -> None:
    """A builder that took the build lock and was SIGKILLed mid-build."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(600)", str(lock_path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with open(lock_path, "a") as f, pytest.raises(BlockingIOError):  # held: a taker would wait
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)


def test_a_killed_builder_leaves_nothing_that_blocks_two_racing_starts(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    env = dict(os.environ)
    source = tmp_path / "tiny.cpp"
    source.write_text(_TINY_SOURCE)
    monkeypatch.setattr(native, "SOURCES", [source])
    monkeypatch.setattr(native, "HEADERS", [])
    name, root = native.module_name(), native.cache_dir()
    root.mkdir(parents=True)
    _hold_lock_then_die(root / f"{name}.lock")
    stale = root / f".{name}-build-killed"  # its half-written build directory
    stale.mkdir()
    (stale / "build.ninja").write_text("half")

    start = time.monotonic()
    racers = [subprocess.Popen([sys.executable, "-c", _CALL, str(source)], env=env,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [r.communicate(timeout=400)[1] for r in racers]
    assert [r.returncode for r in racers] == [0, 0], logs
    assert sum(log.count("building the native CPU kernels") for log in logs) == 1, logs
    assert (root / f"{name}.so").is_file() and not stale.exists()
    assert not list(root.glob(".*-build-*"))
    print(f"cold build with a racer: {time.monotonic() - start:.0f} s")

    # Built: a later start imports it without compiling.
    again = subprocess.run([sys.executable, "-c", _CALL, str(source)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "building" not in again.stderr, again.stderr


def test_a_hung_build_is_abandoned_and_the_pytorch_path_runs(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 0.5)  # a compile cannot finish in this
    native.native_module.cache_clear()
    try:
        assert paged_decode_kernel() is None
        assert "could not be built (RuntimeError: the build did not finish in 0.5 s)" in caplog.text
        assert not list((tmp_path / "fastserve").glob("*.so"))
        assert not list((tmp_path / "fastserve").glob(".*-build-*"))
    finally:
        native.native_module.cache_clear()


def test_without_a_compiler_the_build_step_says_so_and_the_engine_runs_on_pytorch(tmp_path):
    """A machine with no C++ compiler: the set-up step exits 0 with one line saying so, and an
    engine then generates on its PyTorch paths, logging the missing compiler once."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "PATH": "/nonexistent",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    build = subprocess.run([sys.executable, "-m", "fastserve_ray.kernels.build"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    assert "no C++ compiler" in build.stdout and "PyTorch paths" in build.stdout
    script = (
        "import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
        "from fastserve_ray.engine import LLMEngine, SamplingParams\n"
        "from fastserve_ray.models import build_model, get_preset\n"
        "from fastserve_ray.tokenizer import train_tokenizer\n"
        "torch.manual_seed(0)\n"
        "tok = train_tokenizer(['hello world, hello kernels'] * 20, vocab_size=300)\n"
        "engine = LLMEngine(build_model(get_preset('tiny')).eval(), tok, num_blocks=16)\n"
        "for _ in range(2):\n"
        "    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))\n"
        "    assert len(out[0].token_ids) == 4, out\n"
        "print('generated')\n")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "generated" in run.stdout
    assert run.stderr.count("no C++ compiler") == 1, run.stderr  # once, not per load or step
    assert not list((tmp_path / "ext").rglob("*.so"))  # nothing was built
