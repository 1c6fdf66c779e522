"""Loader for the CPU decode-attention kernel that reads the paged K/V cache in place.

``paged_decode_kernel()`` returns the compiled function, or None where it is not available.
The build is cached by PyTorch under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), keyed by the source and flags; the module name also carries a
digest of this CPU's feature flags, because the build targets ``-march=native`` and a home
directory shared across a cluster's nodes must not hand one CPU's binary to another.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode_cpu.cpp")
ENV_SWITCH = "FASTSERVE_NATIVE_KERNELS"
# -ffast-math lets the compiler vectorize exp() and reassociate the fp32 sums; it is given
# to the compile step only (the link step would add crtfastmath, flushing denormals
# process-wide).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
LDFLAGS = ["-fopenmp"]


def native_kernels_enabled() -> bool:
    """False when ``FASTSERVE_NATIVE_KERNELS`` is set to 0/false/no/off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_digest() -> str:
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


@functools.cache
def paged_decode_kernel() -> Callable | None:
    """``paged_decode(q, k_cache, v_cache, block_tables, seq_lens, rows, out, block_size, scale)``.

    Built once per process (and cached on disk); None if disabled or if the build fails, in
    which case the failure is logged once and the PyTorch path runs instead.
    """
    if not native_kernels_enabled():
        return None
    try:
        from torch.utils.cpp_extension import load

        module = load(name=f"fastserve_paged_decode_{_cpu_digest()}", sources=[str(SOURCE)],
                      extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, headers or OpenMP: fall back, loudly
        log.warning("the CPU paged-decode kernel could not be built (%s: %s); decode attention "
                    "runs on the PyTorch path", type(e).__name__, str(e).splitlines()[0][:200])
        return None
    return module.paged_decode
