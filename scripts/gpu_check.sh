#!/usr/bin/env bash
# Device checks for a CUDA machine (run from the repo root with a python3 that has torch):
# the GPU-marked tests and the bf16 training probe; JSON lands in $OUT when set.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider -m gpu tests/models tests/engine 2>&1 | tail -8
python3 scripts/gpu_train_probe.py | tee "${OUT:-/tmp}/gpu_train_probe.log"
