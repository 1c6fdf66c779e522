#!/usr/bin/env bash
# Device checks for a CUDA machine (run from the repo root with a python3 that has torch):
# the GPU-marked tests, the CPU suites that need no Ray, and the bf16 training probe.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider -m gpu tests/models tests/engine 2>&1 | tail -15
python3 -m pytest -q -p no:cacheprovider tests/models tests/engine -x 2>&1 | tail -5
python3 scripts/gpu_train_probe.py
