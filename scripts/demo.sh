#!/usr/bin/env bash
# The main job: the whole pipeline on the built-in corpus (see README "Quickstart").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec "$VENV/bin/fastserve-ray" demo "$@"
