#!/usr/bin/env bash
# The whole test suite (what CI runs): ruff, then pytest. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
echo "[test] ruff check"
"$VENV/bin/ruff" check .
# Test modules run on FASTSERVE_TEST_WORKERS processes (default 1 until the Ray failures seen
# beside another module are understood; 2 cut the wall time to ~12 min), each module whole on one
# of them (its Ray or Serve is per module); 1 runs everything in this process.
# tests/test_ray_job_submit.py runs alone afterwards: its `ray start --head` job agent failed to
# register ("No available agent to submit job") in 2 of 4 runs beside another module's Ray.
workers="${FASTSERVE_TEST_WORKERS:-1}"
PYTEST=("$VENV/bin/python" -m pytest)
if [ "$workers" = "1" ]; then
    echo "[test] pytest (1 process)"
    exec "${PYTEST[@]}" "$@"
fi
paths_given=0
for arg in "$@"; do
    case "$arg" in -*) ;; *) paths_given=1 ;; esac
done
if [ "$paths_given" = "1" ]; then
    echo "[test] pytest (${workers} processes)"
    exec "${PYTEST[@]}" -n "$workers" --dist loadfile "$@"
fi
echo "[test] pytest (${workers} processes), then tests/test_ray_job_submit.py alone"
status=0
"${PYTEST[@]}" -n "$workers" --dist loadfile --ignore=tests/test_ray_job_submit.py "$@" || status=$?
"${PYTEST[@]}" tests/test_ray_job_submit.py "$@" || status=$?
exit "$status"
