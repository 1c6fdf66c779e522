"""The AVX2 plan, end to end, on any x86 machine that has more (FASTSERVE_CPU_ISA=avx2).

Most of the project's machines are AVX-512 ones, most users' are AVX2 ones: without this, every
AVX2 path (fp32 default dtype, plain bf16 linears, the native kernels built for AVX2) would be
untested wherever the code is written. The child process lowers the instruction set for our
plan and kernels, for oneDNN (ONEDNN_MAX_CPU_ISA) and for ATen (ATEN_CPU_CAPABILITY), then runs
engine greedy equivalence, compressed execution, the kernels, the plan and a serving smoke test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastserve_ray.capability import capability

ROOT = Path(__file__).resolve().parents[1]
SELECTION = [
    "tests/engine/test_plan.py",
    "tests/layers/test_packed_linear.py",
    "tests/engine/test_engine_equivalence.py",
    "tests/layers/test_paged_attention.py",
    "tests/layers/test_norm_rope.py",
    "tests/quantized/test_engine_compressed.py",
    "tests/quantized/test_runtime.py",
    "tests/serve/test_serve_units.py::test_server_in_process_matches_engine",
]
AVX2_ENV = {"FASTSERVE_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
CAP = capability()
# On an AVX2 machine the main run is the AVX2 run; a forced run does not nest another.
WHY_NOT = "this process runs a forced ISA already" if CAP.is_forced else CAP.lacks("avx512f")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))

_PLAN_SCRIPT = """
import logging, torch
logging.basicConfig(level=logging.INFO)
from fastserve_ray.engine import LLMEngine
from fastserve_ray.models import build_model, get_preset
for dtype in (None, torch.bfloat16):
    model = build_model(get_preset("tiny")).eval()
    engine = LLMEngine(model.to(dtype) if dtype else model, None, num_blocks=8)
    print(engine.plan.line())
"""


def _env() -> dict[str, str]:
    env = {**os.environ, **AVX2_ENV}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the forced run's own (envs.apply_forced_isa)
    return env


def test_the_avx2_plan_is_chosen_and_bf16_models_load_without_warnings():
    run = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT], env=_env(), capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    fp32, bf16 = run.stdout.strip().splitlines()
    assert "dtype=float32" in fp32 and "linear=onednn-packed" in fp32 and "cpu=avx2 (forced" in fp32
    assert "dtype=bfloat16" in bf16 and "linear=plain" in bf16 and "few_rows_linear=off" in bf16
    # Nothing tried that the CPU cannot run. The AVX2 kernels' one-time build (its progress
    # lines are warnings so a user sees why the first load waits) is not such an attempt.
    build = ("building the native CPU kernels (", "native kernel build is still running",
             "built the native CPU kernels in")
    warnings = [line for line in run.stderr.splitlines()
                if "WARNING" in line and not any(b in line for b in build)]
    assert not warnings, run.stderr


def test_engine_compressed_kernel_and_serving_tests_pass_under_the_avx2_plan():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *SELECTION]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail


def test_the_selection_names_existing_tests():
    assert [p for p in SELECTION if not (ROOT / p.split("::")[0]).is_file()] == []
