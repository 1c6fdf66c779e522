"""What this machine can run, detected once: the CPU's instruction set, CUDA, a C++ compiler.

Every choice of a fast path asks this one object (``capability()``) instead of probing on its
own or trying a backend and catching the error: the engine plan (engine/plan.py), oneDNN
weight packing, the native kernels' compiler flags, and the tests' skip conditions, whose
reasons name the capability that is missing.

``FASTSERVE_CPU_ISA`` (see envs.py) lowers the instruction-set level below what the CPU has,
so that an AVX-512 machine also exercises the AVX2 plan; asking for more than the CPU has is
an error.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fastserve_ray.envs import ISA_LEVELS, overrides
from fastserve_ray.errors import ConfigError

# The flags each level needs on top of the previous one (Linux /proc/cpuinfo names).
_LEVEL_FLAGS = {
    "avx2": {"avx2", "fma"},
    "avx512f": {"avx512f"},
    "avx512": {"avx512bw", "avx512vl", "avx512dq"},
    "avx512_bf16": {"avx512_bf16"},
    "amx": {"amx_tile", "amx_bf16"},
}
# -march for the native kernels when the level is forced below the CPU's own (else native).
_MARCH = {
    "generic": ["-march=x86-64"],
    "avx2": ["-march=haswell"],
    "avx512f": ["-march=haswell", "-mavx512f"],
    "avx512": ["-march=skylake-avx512"],
    "avx512_bf16": ["-march=cooperlake"],
    "amx": ["-march=sapphirerapids"],
}


def _cpuinfo_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _torch_flags() -> frozenset[str]:
    """Flags implied by what torch detected, where /proc/cpuinfo is not readable (macOS...)."""
    import torch

    flags: set[str] = set()
    level = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if level in ("AVX2", "AVX512"):
        flags |= _LEVEL_FLAGS["avx2"]
    if level == "AVX512":
        flags |= _LEVEL_FLAGS["avx512f"] | _LEVEL_FLAGS["avx512"]
        if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            flags |= _LEVEL_FLAGS["avx512_bf16"]
        if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            flags |= _LEVEL_FLAGS["amx"]
    return frozenset(flags)


def isa_level(flags: frozenset[str]) -> str:
    """The highest level of ISA_LEVELS whose flags (and all lower levels' flags) are present."""
    level = "generic"
    for name in ISA_LEVELS[1:]:
        if not _LEVEL_FLAGS[name] <= flags:
            break
        level = name
    return level


@dataclass(frozen=True)
class Capability:
    """This process's view of the machine (the instruction-set level after any forcing)."""

    isa: str  # one of envs.ISA_LEVELS
    detected_isa: str  # what the CPU itself has
    cpu_flags: frozenset[str] = field(repr=False)
    machine: str  # platform.machine(): x86_64, aarch64, ...
    cuda: bool
    cuda_capability: tuple[int, int] | None
    compiler: str | None  # path of the C++ compiler that builds the native kernels
    native_kernels_wanted: bool  # not switched off by FASTSERVE_NATIVE_KERNELS

    @property
    def is_forced(self) -> bool:
        """Whether FASTSERVE_CPU_ISA lowered the level below the CPU's own."""
        return self.isa != self.detected_isa

    def at_least(self, level: str) -> bool:
        """Whether the (effective) instruction-set level includes ``level``."""
        return ISA_LEVELS.index(self.isa) >= ISA_LEVELS.index(level)

    @property
    def fast_bf16(self) -> bool:
        """Native bf16 dot products (AVX-512 BF16 or AMX): bf16 is then the default dtype."""
        return self.at_least("avx512_bf16")

    @property
    def onednn_bf16(self) -> bool:
        """Whether oneDNN packs and multiplies bf16 weights (AVX-512 BW/VL/DQ, or AVX-NE-CONVERT
        on AVX2-class CPUs); elsewhere its bf16 reorder raises."""
        return self.at_least("avx512") or (not self.is_forced and "avx_ne_convert" in self.cpu_flags)

    @property
    def native_kernels_possible(self) -> bool:
        """Whether the native kernels can exist here: wanted and a compiler to build them."""
        return self.native_kernels_wanted and self.compiler is not None

    def march_flags(self) -> list[str]:
        """The compiler's target flags for the native kernels: this CPU, or the forced level."""
        if not self.is_forced or self.machine not in ("x86_64", "AMD64"):
            return ["-march=native"]
        return list(_MARCH[self.isa])

    def lacks(self, need: str) -> str | None:
        """None where ``need`` is available, else a reason naming what is missing (for skips and
        logs). ``need``: an ISA level, ``onednn_bf16``, ``compiler``, ``native_kernels`` or ``cuda``."""
        here = f"this process runs at {self.isa}" + (f" (FASTSERVE_CPU_ISA; the CPU has {self.detected_isa})"
                                                    if self.is_forced else "")
        if need in ISA_LEVELS:
            return None if self.at_least(need) else f"needs {need}; {here}"
        if need == "onednn_bf16":
            return None if self.onednn_bf16 else (
                f"needs oneDNN bf16 (avx512bw+vl+dq or avx_ne_convert); {here}")
        if need == "compiler":
            return None if self.compiler else "needs a C++ compiler ($CXX or c++ on PATH)"
        if need == "native_kernels":
            if not self.native_kernels_wanted:
                return "needs the native kernels (FASTSERVE_NATIVE_KERNELS is off)"
            return None if self.compiler else "needs the native kernels (no C++ compiler)"
        if need == "cuda":
            return None if self.cuda else "needs a CUDA device"
        raise ValueError(f"unknown capability {need!r}")

    def lacks_any(self, *needs: str) -> str | None:
        """The first of ``lacks(need)`` that is not None (None where all are available)."""
        return next((r for r in map(self.lacks, needs) if r is not None), None)

    def describe(self) -> str:
        """One line for logs and snapshots."""
        isa = f"{self.isa} (forced; the CPU has {self.detected_isa})" if self.is_forced else self.isa
        cc = self.cuda_capability
        cuda = f"cuda sm{cc[0]}{cc[1]}" if cc else "no cuda"
        native = ("native kernels off" if not self.native_kernels_wanted else
                  "no C++ compiler" if self.compiler is None else "C++ compiler")
        return f"cpu={isa}, {cuda}, {native}"

    def as_dict(self) -> dict:
        """JSON-ready summary (engine snapshots, bench reports)."""
        return {"isa": self.isa, "detected_isa": self.detected_isa, "forced": self.is_forced,
                "machine": self.machine, "cuda_capability": self.cuda_capability,
                "compiler": self.compiler, "native_kernels_wanted": self.native_kernels_wanted}


def _compiler() -> str | None:
    # torch.utils.cpp_extension builds with $CXX, else c++.
    return shutil.which(os.environ.get("CXX") or "c++")


def detect() -> Capability:
    """Detect the capability now (``capability()`` caches this)."""
    import torch

    flags = _cpuinfo_flags() or _torch_flags()
    detected = isa_level(flags)
    isa = overrides().cpu_isa or detected
    if ISA_LEVELS.index(isa) > ISA_LEVELS.index(detected):
        raise ConfigError(f"FASTSERVE_CPU_ISA={isa!r}: this CPU has at most {detected!r}")
    cuda = torch.cuda.is_available()
    return Capability(
        isa=isa, detected_isa=detected, cpu_flags=flags, machine=platform.machine(), cuda=cuda,
        cuda_capability=tuple(torch.cuda.get_device_capability()) if cuda else None,
        compiler=_compiler(), native_kernels_wanted=overrides().native_kernels)


@functools.cache
def capability() -> Capability:
    """The machine's capability, detected once per process."""
    return detect()


def refresh() -> Capability:
    """Forget the cached capability and overrides (tests that change the environment)."""
    overrides.cache_clear()
    capability.cache_clear()
    return capability()
