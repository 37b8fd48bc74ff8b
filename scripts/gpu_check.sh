#!/usr/bin/env bash
# The GPU checks that no CPU machine can run, as ONE command for a session that is lent a GPU (the device tool):
#   1. train: bf16 expert-training throughput and MFU (benchmarks/bench_gpu_train.py, OLMo-2 1B shape, one round,
#      its one-process NCCL FSDP variant included);
#   2. fsdp: `train-expert --fsdp` over NCCL across processes, one per GPU (skipped with fewer than 2 GPUs);
#   3. serve: benchmarks/bench_serve.py with flexolmo's own runtime on the GPU (--device cuda);
#   4. vllm: the vLLM plugin against flexolmo's CPU runtime, and its throughput (bench_serve.py --vllm), then the
#      glue's tests (tests/test_serve_vllm_glue.py, which CI runs on vLLM's CPU build), only where `import vllm`
#      works (it says so when it does not).
# Every output line starts with the device's name; JSON results go under $OUT (or /tmp/flexolmo-gpu-check), with
# a summary of what ran, failed or was skipped in gpu_check.json.
#
# The device machine reaches no package registry, and its image lacks some of flexolmo's dependencies, so:
#   bash scripts/gpu_check.sh --prepare   # HERE (pip works): wheels of those dependencies into .whl/ (git-ignored)
#   bash scripts/gpu_check.sh             # THERE, with carry [".whl"]: installs the carried wheels it lacks, runs
#   bash scripts/gpu_check.sh --dry-run   # anywhere: the parts a CPU can run (a small serve run), GPU parts skipped
# A vLLM wheel (hundreds of MB, built for one torch) cannot be carried within the device tool's 64 MiB.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
case $MODE in run | --dry-run | --prepare) ;; *) echo "usage: bash scripts/gpu_check.sh [--prepare | --dry-run]"; exit 2 ;; esac
if [ -z "${PYTHON:-}" ]; then PYTHON=python3; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
RESULTS=${OUT:-/tmp/flexolmo-gpu-check}
WORK=/tmp/flexolmo-gpu-check-work
# What flexolmo's serving and training import beyond the device tool's GPU image (its package list), with
# everything they require: --prepare fetches this closure at the versions installed here.
ROOTS="fastapi uvicorn openai pydantic pyOpenSSL securesystemslib prometheus-client httpx pytest"

if [ "$MODE" = --prepare ]; then
  pins=$("$PYTHON" - $ROOTS <<'PY'
import importlib.metadata as metadata, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
# The image's Python and platform; the big GPU stack is the image's own and never carried.
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
       "platform_system": "Linux", "platform_machine": "x86_64", "platform_python_implementation": "CPython",
       "implementation_name": "cpython", "extra": ""}
SKIP = {"torch", "triton", "numpy", "transformers", "tokenizers", "safetensors", "huggingface-hub", "setuptools"}
todo, pins = list(sys.argv[1:]), {}
while todo:
    name = canonicalize_name(todo.pop())
    if name in pins or name in SKIP or name.startswith("nvidia-"):
        continue
    try:
        pins[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        continue  # a requirement of another platform or Python
    todo += [req.name for req in map(Requirement, metadata.requires(name) or [])
             if req.marker is None or req.marker.evaluate(ENV)]
print(" ".join(f"{name}=={version}" for name, version in sorted(pins.items())))
PY
) || exit 1
  mkdir -p .whl
  for pin in $pins; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pin" 2>/dev/null || echo "FAILED to fetch $pin"
  done
  du -sh .whl && echo "now run it on the device with carry [\".whl\"]: bash scripts/gpu_check.sh"
  exit 0
fi

mkdir -p "$RESULTS" "$WORK"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then  # install the carried wheels the image lacks or has older versions of
  needed=$("$PYTHON" - .whl/*.whl <<'PY'
import importlib.metadata as metadata, os, sys
from packaging.version import Version
for path in sys.argv[1:]:
    name, version = os.path.basename(path).split("-")[:2]
    try:
        if Version(metadata.version(name)) >= Version(version):
            continue
    except metadata.PackageNotFoundError:
        pass
    print(path)
PY
)
  if [ -n "$needed" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" $needed \
      && export PYTHONPATH="$WORK/site:$PYTHONPATH"  # before the image's own, which are older
  fi
fi
DEVICE=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  2>/dev/null || echo "no torch")
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
[ "$MODE" = --dry-run ] && GPUS=0
STATUS=()
say() { echo "[$DEVICE] $*"; }
skip() { say "== $1: SKIPPED: $2"; STATUS+=("\"$1\": \"skipped: $2\""); }
step() {  # step NAME SECONDS COMMAND...: with a time limit, the device's name before every line it prints
  local name=$1 limit=$2 rc
  shift 2
  say "== $name: $*"
  timeout "$limit" "$@" 2>&1 | sed -u "s|^|[$DEVICE] |"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then STATUS+=("\"$name\": \"ok\""); else STATUS+=("\"$name\": \"failed (exit $rc)\""); fi
}

say "flexolmo GPU check ($MODE): $GPUS GPU(s), python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), results in $RESULTS"
if ! probe=$("$PYTHON" -c "import flexolmo.serve.threaded, flexolmo.training.loop, openai" 2>&1); then
  say "flexolmo cannot import its dependencies here: $(echo "$probe" | tail -1)"
  say "run 'bash scripts/gpu_check.sh --prepare' where pip works, then this again with carry [\".whl\"]"
  exit 1
fi

if [ "$GPUS" -ge 1 ]; then
  step train 200 "$PYTHON" benchmarks/bench_gpu_train.py --steps 5 --warmup 2 --rounds 1 \
    --out "$RESULTS/gpu_train.json"
else
  skip train "no GPU: bf16 training throughput needs CUDA"
fi

if [ "$GPUS" -ge 2 ]; then
  step fsdp 120 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m flexolmo train-expert \
    --anchor data/demo/anchor --data data/demo/code.train.jsonl.gz --name code --out "$WORK/fsdp-expert" --fsdp \
    --device cuda --dtype bfloat16 --steps 20 --batch-size "$((2 * GPUS))" --seq-len 256
else
  skip fsdp "$GPUS GPU(s): FSDP over NCCL across processes needs 2 or more (train's coordinated-fsdp ran one process)"
fi

if [ "$GPUS" -ge 1 ]; then
  step serve 200 "$PYTHON" benchmarks/bench_serve.py --device cuda --withdrawals 0 --workdir "$WORK/serve" \
    --out "$RESULTS/serve_cuda.json"
else  # the same benchmark, small, on the CPU: the plumbing, not a number to report
  step serve-cpu 600 "$PYTHON" benchmarks/bench_serve.py --device cpu --streams 8 --requests 1 --max-tokens 4 \
    --rounds 1 --withdrawals 0 --workdir "$WORK/serve" --out "$RESULTS/serve_cpu.json"
fi

if ! why=$("$PYTHON" -c "import vllm" 2>&1); then
  skip vllm "vllm is not importable ($(echo "$why" | tail -1 | tr -d '"\\')): the vLLM plugin was NOT run"
elif [ "$GPUS" -lt 1 ]; then
  skip vllm "vllm imports but there is no GPU: the vLLM plugin was NOT run"
else
  say "vllm $("$PYTHON" -c 'import vllm; print(vllm.__version__)' 2>&1 | tail -1) (the plugin was run on 0.32.0, its CPU build)"
  step vllm 200 "$PYTHON" benchmarks/bench_serve.py --vllm --workdir "$WORK/serve" --out "$RESULTS/serve_vllm.json"
  # The glue's own tests against flexolmo's runtime: masks, router biases, every family, the prefix cache, the server.
  step vllm-tests 200 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_serve_vllm_glue.py
fi

summary=$(IFS=,; echo "${STATUS[*]}")
echo "{\"device\": \"$DEVICE\", \"gpus\": $GPUS, \"mode\": \"$MODE\", \"steps\": {$summary}}" >"$RESULTS/gpu_check.json"
say "summary: $(cat "$RESULTS/gpu_check.json")"
