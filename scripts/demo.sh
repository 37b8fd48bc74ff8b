#!/usr/bin/env bash
# Set up .venv (if needed) and run the demo on the shipped anchor and corpora. Extra arguments go to
# `flexolmo demo` (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/flexolmo demo "$@"
