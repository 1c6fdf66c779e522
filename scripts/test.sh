#!/usr/bin/env bash
# The whole test suite (what CI runs): ruff, then pytest. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
echo "[test] ruff check"
"$VENV/bin/ruff" check .
# Test modules run on FASTSERVE_TEST_WORKERS processes (default 2), each module whole on one
# of them (its Ray or Serve is per module); 1 runs everything in this process.
workers="${FASTSERVE_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != "1" ]; then
    parallel=(-n "$workers" --dist loadfile)
fi
echo "[test] pytest (${workers} process(es))"
exec "$VENV/bin/python" -m pytest "${parallel[@]}" "$@"
