#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what it needs.
# Idempotent: a stamp holding the hash of pyproject.toml skips the install when
# nothing changed. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTSERVE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# A CPU build of torch is taken when no torch is installed and no GPU is visible.
# GPU users: install the CUDA build of torch into the venv first, or set TORCH_SPEC.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$PY" ]; then
    echo "[bootstrap] creating virtual environment in $VENV"
    python3 -m venv "$VENV"
fi

stamp="$VENV/.fastserve-ray-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "[bootstrap] installing $TORCH_SPEC"
        "$PY" -m pip install -q "$TORCH_SPEC"
    fi
    echo "[bootstrap] installing fastserve-ray and test tools (first run takes about a minute)"
    "$PY" -m pip install -q -e "$ROOT[test]"
    echo "$want" > "$stamp"
fi
# The native CPU kernels, built here once per machine (about 30 s on 2 cores) so that no
# later command compiles in the middle of a stage; one line when they are built already.
# Without a C++ compiler this says so and the engine runs on its PyTorch paths.
"$PY" -m fastserve_ray.kernels.build
export PATH="$VENV/bin:$PATH"
