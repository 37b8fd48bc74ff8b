#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite. Extra arguments go to pytest.
# The suite runs on every core (pytest-xdist, at most 4 workers): each test builds its own tiny models and
# servers on free ports, so tests do not share state across workers. Every process then computes on one
# thread (OMP_NUM_THREADS=1) so that workers do not fight over the cores; runs compared with each other in a
# test use the same thread count, so results that must match bit for bit still do.
# TEST_WORKERS=0 runs in one process (for a debugger, or --durations that add up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers="${TEST_WORKERS:-auto}"
if [ "$workers" = "0" ]; then
  exec .venv/bin/python -m pytest "$@"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -n "$workers" --maxprocesses 4 "$@"
