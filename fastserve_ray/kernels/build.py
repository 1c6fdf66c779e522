"""Build the native CPU kernels now (the set-up step runs this): ``python -m fastserve_ray.kernels.build``.

Building at install means no user command compiles in the middle of a stage. Exit status 0 also
where the kernels cannot be built (no C++ compiler, switched off): the engine then runs on its
PyTorch paths, and this says so in one line.
"""

from __future__ import annotations

import logging
import sys
import time

from fastserve_ray.capability import capability
from fastserve_ray.kernels import native


def main() -> int:
    """Build (or find) the kernels for this machine; print one line saying which."""
    logging.basicConfig(level=logging.WARNING, format="[kernels] %(message)s")
    cap = capability()
    if not cap.native_kernels_wanted:
        print(f"[kernels] {native.ENV_SWITCH} is off: nothing to build")
        return 0
    if native.built_path().is_file():
        print(f"[kernels] native CPU kernels already built for {cap.describe()}: {native.built_path()}")
        return 0
    if cap.compiler is None:
        print("[kernels] no C++ compiler ($CXX or c++): the engine runs on its PyTorch paths "
              "(install g++ and rerun for the fast CPU kernels)")
        return 0
    print(f"[kernels] building the native CPU kernels for {cap.describe()} "
          "(once per machine, about 30 s on 2 cores)", flush=True)
    start = time.monotonic()
    module = native.native_module()
    if module is None:
        print("[kernels] the build failed (see above): the engine runs on its PyTorch paths")
        return 0
    print(f"[kernels] built in {time.monotonic() - start:.0f} s: {native.built_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
