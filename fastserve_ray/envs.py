"""Every environment switch of fastserve-ray, read in this one module.

They are overrides for people debugging or benchmarking; the normal way to choose a backend is
the engine config (``engine.attention_backend`` ...). Each is read once per process by
``overrides()`` (tests that change one call ``overrides.cache_clear()``).

| variable | values | effect |
|---|---|---|
| ``FASTSERVE_CPU_ISA`` | ``avx2``, ``avx512f``, ``avx512``, ``avx512_bf16``, ``amx`` | see below |
| ``FASTSERVE_NATIVE_KERNELS`` | ``0``/``false``/``no``/``off`` | never build or load the native CPU kernels |
| ``FASTSERVE_ATTENTION`` | ``auto``, ``paged``, ``flex`` | overrides ``engine.attention_backend`` |
| ``FASTSERVE_LINEAR`` | ``auto``, ``plain``, ``onednn-packed`` | overrides ``engine.linear_backend`` |

``FASTSERVE_CPU_ISA`` treats the CPU as having at most that instruction set: the engine plan,
the native kernels' ``-march``, oneDNN (``ONEDNN_MAX_CPU_ISA``) and, when set before torch is
imported, ATen (``ATEN_CPU_CAPABILITY``) all follow, so an AVX-512 machine runs the AVX2 plan
end to end.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from dataclasses import dataclass

from fastserve_ray.errors import ConfigError

CPU_ISA = "FASTSERVE_CPU_ISA"
NATIVE_KERNELS = "FASTSERVE_NATIVE_KERNELS"
ATTENTION = "FASTSERVE_ATTENTION"
LINEAR = "FASTSERVE_LINEAR"

# Instruction-set levels, each including the ones before it.
ISA_LEVELS = ("generic", "avx2", "avx512f", "avx512", "avx512_bf16", "amx")
ATTENTION_BACKENDS = ("auto", "paged", "flex")
LINEAR_BACKENDS = ("auto", "plain", "onednn-packed")
_OFF = ("0", "false", "no", "off")

# What the forced level tells the libraries below us (oneDNN's and ATen's own switches).
_ONEDNN_ISA = {"generic": "SSE41", "avx2": "AVX2", "avx512f": "AVX2", "avx512": "AVX512_CORE",
               "avx512_bf16": "AVX512_CORE_BF16"}
_ATEN_ISA = {"generic": "default", "avx2": "avx2", "avx512f": "avx2", "avx512": "avx512",
             "avx512_bf16": "avx512", "amx": "avx512"}


@dataclass(frozen=True)
class Overrides:
    """The switches as set in this process's environment (None: not set)."""

    cpu_isa: str | None
    native_kernels: bool
    attention_backend: str | None
    linear_backend: str | None


def _choice(name: str, allowed: tuple[str, ...]) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: choose one of {allowed}")
    return value


@functools.cache
def overrides() -> Overrides:
    """The environment's overrides, validated (a bad value is a ConfigError naming it)."""
    attention = _choice(ATTENTION, ATTENTION_BACKENDS)
    linear = _choice(LINEAR, LINEAR_BACKENDS)
    return Overrides(
        cpu_isa=_choice(CPU_ISA, ISA_LEVELS),
        native_kernels=os.environ.get(NATIVE_KERNELS, "1").strip().lower() not in _OFF,
        attention_backend=None if attention == "auto" else attention,
        linear_backend=None if linear == "auto" else linear,
    )


def apply_forced_isa() -> None:
    """Pass a forced ``FASTSERVE_CPU_ISA`` on to oneDNN and ATen (unless they are set already).

    Called when the package is imported, before any oneDNN primitive exists (oneDNN reads its
    limit once, at its first use). ATen's dispatch level is fixed when torch loads, so it only
    follows where torch was not imported yet; a forced-ISA test run sets it itself.
    """
    isa = os.environ.get(CPU_ISA, "").strip().lower()
    if isa not in ISA_LEVELS:
        return  # unset, or a typo that overrides() reports where it is used
    if isa in _ONEDNN_ISA:
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", _ONEDNN_ISA[isa])
    if "torch" not in sys.modules:
        os.environ.setdefault("ATEN_CPU_CAPABILITY", _ATEN_ISA[isa])
    # Inductor's on-disk cache does not tell these runs apart: a forced run's compiled kernels,
    # loaded later by a normal run on the same machine, aborted it. A cache of their own.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"torchinductor-fastserve-{isa}"))
