#!/usr/bin/env bash
# The whole test suite (what CI runs): ruff, then pytest. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
echo "[test] ruff check"
"$VENV/bin/ruff" check .
echo "[test] pytest"
exec "$VENV/bin/python" -m pytest "$@"
