#!/usr/bin/env bash
# Mutation testing of flexolmo's core modules with mutmut (pinned in the `mutation` extra; run locally, NOT in CI).
#
# For each core module (routing = moe, merge, package = package.py + trust/, evaluate, privacy, training, serving =
# the serving masks: access rules, the scheduler and its caches, the vLLM plugin's mask path), or the ones named
# as arguments, this copies src/, tests/ and pyproject.toml into a fresh scratch directory, lets mutmut generate
# mutants of that module only, and runs each mutant against the focused test files listed below (per mutant
# mutmut runs only the tests that executed the mutated function). The repository's src/ is never
# modified: mutated code only ever exists in the scratch directory, which is deleted on exit (unless --keep).
#
# It writes one entry per module to benchmarks/results/mutation.json (killed / total, survived, timeouts, no
# tests, the command, date, commit, seconds per mutant; a sample says it is one and of how many) and the diff of
# every mutant that was not killed to benchmarks/results/mutation-survivors/<module>.txt (next to the results).
#
# How long: each mutant costs one forked pytest run of the tests that cover the mutated function (session
# fixtures, such as the tiny anchor, included), plus a fixed start of ~1 min per module (mutant generation, one
# traced run of the test files, a clean run). Measured on a quiet 2-core machine, one worker, nice 19, seconds
# per mutant: evaluate 0.85, privacy 2.8, merge 3.1, package 2.5, training 6.2; full runs from 3 min (evaluate)
# to about an hour (package; see TESTING.md). Use --max-mutants N for a seeded random sample of N mutants per
# module; the score then says it is a sample of N out of the total.
#
# Usage: scripts/mutation.sh [--max-mutants N] [--seed S] [--jobs J] [--tests "tests/a.py tests/b.py"]
#                            [--keep] [--out FILE] [--list] [--estimate] [MODULE ...]
#   MODULE         moe | merge | package | evaluate | privacy | training | serving (default: all seven)
#   --max-mutants  run a seeded random sample of at most N mutants per module (default: all mutants)
#   --seed         seed of the sample (default 0)
#   --jobs         parallel mutmut workers (default 1)
#   --tests        override the test files for the (single) module given
#   --keep         keep the scratch directory (to run `mutmut show NAME` / `mutmut browse` in it)
#   --out          results file (default benchmarks/results/mutation.json; other modules' entries are kept)
#   --list         print the module table and exit
#   --estimate     only generate the mutants and run the tests once (mutmut's stats), then print how many
#                  mutants there are and the worst-case test time (every mutant surviving); writes no results
# Be kind to a shared machine: `nice -n 19 scripts/mutation.sh ...` (children inherit the niceness).
# Requires: .venv/bin/python -m pip install -e '.[mutation]'   (mutmut 3.8.1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
MUTMUT="$(dirname "$PY")/mutmut"

# Module -> files mutmut mutates (globs relative to the repository root) and the test files that exercise them.
declare -A SOURCES=(
    [moe]="src/flexolmo/model/moe.py"
    [merge]="src/flexolmo/coordinator/merge.py"
    [package]="src/flexolmo/owner/package.py src/flexolmo/trust/*.py"
    [evaluate]="src/flexolmo/evaluation/scoring.py"
    [privacy]="src/flexolmo/owner/privacy.py"
    [training]="src/flexolmo/training/loop.py"
    [serving]="src/flexolmo/serve/access.py src/flexolmo/serve/engine.py src/flexolmo/serve/kvcache.py src/flexolmo/serve/vllm_plugin/core.py"
)
declare -A TESTS=(
    [moe]="tests/test_moe.py tests/test_merge.py"
    [merge]="tests/test_merge.py tests/test_router_bias.py tests/test_router_tuning.py"
    [package]="tests/test_trust.py tests/test_expert.py"
    [evaluate]="tests/test_evaluate.py tests/test_cli.py tests/test_moe.py"
    [privacy]="tests/test_privacy.py tests/test_early_checks.py"
    [training]="tests/test_expert.py tests/test_run_state.py tests/test_privacy.py"
    [serving]="tests/test_serve_access.py tests/test_serve_vllm_core.py tests/test_serve_engine.py tests/test_serve_cache.py tests/test_serve_rowmask.py"
)
ALL_MODULES=(moe merge package evaluate privacy training serving)

MAX_MUTANTS=0
SEED=0
JOBS=1
KEEP=0
ESTIMATE=0
TESTS_OVERRIDE=""
OUT="benchmarks/results/mutation.json"
MODULES=()
COMMAND="scripts/mutation.sh $*"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --max-mutants) MAX_MUTANTS=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --tests) TESTS_OVERRIDE=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --estimate) ESTIMATE=1; shift ;;
        --out) OUT=$2; shift 2 ;;
        --list)
            for m in "${ALL_MODULES[@]}"; do printf '%-9s mutate: %s\n%-9s tests:  %s\n' "$m" "${SOURCES[$m]}" "" "${TESTS[$m]}"; done
            exit 0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [[ -n "${SOURCES[$1]:-}" ]] || { echo "unknown module $1: one of ${ALL_MODULES[*]}" >&2; exit 2; }
           MODULES+=("$1"); shift ;;
    esac
done
[[ ${#MODULES[@]} -gt 0 ]] || MODULES=("${ALL_MODULES[@]}")
[[ "$OUT" = /* ]] || OUT="$ROOT/$OUT"
if [[ -n "$TESTS_OVERRIDE" && ${#MODULES[@]} -ne 1 ]]; then echo "--tests needs exactly one module" >&2; exit 2; fi
[[ "$MAX_MUTANTS" =~ ^[0-9]+$ && "$JOBS" =~ ^[1-9][0-9]*$ && "$SEED" =~ ^[0-9]+$ ]] \
    || { echo "--max-mutants, --seed and --jobs take whole numbers" >&2; exit 2; }
if [[ ! -x "$MUTMUT" ]] || [[ "$("$PY" -c 'import mutmut; print(mutmut.__version__)' 2>/dev/null)" != "3.8.1" ]]; then
    echo "mutmut 3.8.1 is not installed in $(dirname "$PY"): $PY -m pip install -e '.[mutation]'" >&2
    exit 2
fi
grep -q '^\[tool\.mutmut\]' pyproject.toml && { echo "pyproject.toml has a [tool.mutmut] table; this script writes its own" >&2; exit 2; }

# One core per worker, so --jobs 1 really uses one core of a shared machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1

SCRATCHES=()
cleanup() {
    if [[ $KEEP -eq 0 ]]; then
        for d in "${SCRATCHES[@]}"; do rm -rf -- "$d"; done
    elif [[ ${#SCRATCHES[@]} -gt 0 ]]; then
        echo "kept scratch directories: ${SCRATCHES[*]}"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$([[ -n "$(git status --porcelain -- src tests 2>/dev/null)" ]] && echo true || echo false)
SURVIVORS="$(dirname "$OUT")/mutation-survivors"
mkdir -p "$SURVIVORS"
FAILED=()

for module in "${MODULES[@]}"; do
    tests=${TESTS_OVERRIDE:-${TESTS[$module]}}
    # shellcheck disable=SC2206
    sources=(${SOURCES[$module]})   # globs expand here, against the repository
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/flexolmo-mutation-$module.XXXXXX")
    SCRATCHES+=("$scratch")
    log="${TMPDIR:-/tmp}/flexolmo-mutation-$module.log"
    echo "== $module: mutating ${sources[*]} with $tests (scratch $scratch, log $log)"

    cp -r src tests "$scratch/"
    find "$scratch" -name __pycache__ -type d -prune -exec rm -rf {} +
    # The repository's pyproject plus mutmut's settings for this module (a [tool.mutmut] table is appended).
    "$PY" - "$scratch" "$tests" "${sources[@]}" <<'EOF'
import json, sys
from pathlib import Path
scratch, tests, sources = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
text = Path("pyproject.toml").read_text()
text += "\n[tool.mutmut]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in {
    "source_paths": ["src"],
    "only_mutate": sources,
    "pytest_add_cli_args_test_selection": tests,
    "pytest_add_cli_args": ["-p", "no:cacheprovider"],
    "use_git_change_detection": False,
}.items()) + "\n"
(scratch / "pyproject.toml").write_text(text)
EOF

    start=$(date +%s)
    # 1. Generate the mutants (mutmut's own generation step) and choose the ones to run.
    names_file="$scratch/selected-mutants.txt"
    if ! (cd "$scratch" && "$PY" - "$MAX_MUTANTS" "$SEED" "$names_file" >"$log" 2>&1) <<'EOF'
import json, os, random, sys
from pathlib import Path
from mutmut.__main__ import create_mutants
from mutmut.configuration import config
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, walk_mutatable_files
max_mutants, seed, names_file = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
os.makedirs("mutants", exist_ok=True)
copy_src_dir()
copy_also_copy_files()
create_mutants(1)
names = sorted(name for path in walk_mutatable_files()
               for name in json.loads(Path("mutants", f"{path}.meta").read_text())["exit_code_by_key"])
chosen = sorted(random.Random(seed).sample(names, max_mutants)) if 0 < max_mutants < len(names) else names
names_file.write_text("\n".join(chosen) + "\n")
Path(str(names_file) + ".total").write_text(str(len(names)))
print(f"{len(names)} mutants generated, {len(chosen)} selected")
EOF
    then
        echo "   mutant generation failed; see $log" >&2; tail -20 "$log" >&2; FAILED+=("$module"); continue
    fi
    total=$(cat "$names_file.total")
    selected=$(grep -c . "$names_file" || true)
    [[ $ESTIMATE -eq 1 ]] || echo "   $total mutants generated; running $selected$([[ $selected -lt $total ]] && echo " (seeded sample, seed $SEED)")"

    if [[ $ESTIMATE -eq 1 ]]; then
        rc=0
        (cd "$scratch" && PYTHONPATH="$scratch/mutants/src" "$MUTMUT" print-time-estimates) >"$scratch/estimates.txt" 2>>"$log" || rc=$?
        [[ $rc -eq 0 ]] || { echo "   mutmut print-time-estimates exited $rc; see $log" >&2; FAILED+=("$module"); continue; }
        "$PY" - "$scratch/estimates.txt" "$names_file" "$(( $(date +%s) - start ))" <<'EOF'
import re, sys
from pathlib import Path
chosen = set(Path(sys.argv[2]).read_text().split())
times = {m.group(2): (None if m.group(1) == "<no tests>" else int(m.group(1)[:-2]) / 1000)
         for m in re.finditer(r"^(<no tests>|\d+ms) (\S+)$", Path(sys.argv[1]).read_text(), re.M)}
times = {k: v for k, v in times.items() if k in chosen}
covered = [v for v in times.values() if v is not None]
print(f"   {len(times)} mutants, {len(times) - len(covered)} in functions no selected test runs; worst case "
      f"(every covered mutant survives) {sum(covered):.0f} s of test time, {sum(covered) / max(len(covered), 1):.1f} s "
      f"per covered mutant, plus a per-mutant overhead (fork, pytest, session fixtures); stats took {sys.argv[3]} s")
EOF
        continue
    fi

    # 2. Run them: stats (which test covers which function), a clean run, a forced-failure check, then the mutants.
    run_args=(run --max-children "$JOBS")
    if [[ $selected -lt $total ]]; then mapfile -t chosen <"$names_file"; run_args+=("${chosen[@]}"); fi
    rc=0
    # PYTHONPATH: tests that start `python -m flexolmo` in a subprocess get the mutated tree too, not the
    # repository's src/ (which the editable install points at).
    (cd "$scratch" && PYTHONPATH="$scratch/mutants/src" "$MUTMUT" "${run_args[@]}") >>"$log" 2>&1 || rc=$?
    end=$(date +%s)
    if [[ $rc -ne 0 ]]; then
        echo "   mutmut exited $rc (a failing clean test run stops it); see $log" >&2
        tail -30 "$log" >&2; FAILED+=("$module"); continue
    fi

    # 3. Score and survivors.
    (cd "$scratch" && "$PY" - "$OUT" "$SURVIVORS/$module.txt" "$module" \
        "$names_file" "$total" "$SEED" "$tests" "$((end - start))" "$COMMAND" "$COMMIT" "$DIRTY" "$JOBS" "$log" \
        "${sources[@]}") <<'EOF'
import ast, datetime, json, re, sys
from collections import Counter
from pathlib import Path
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

(out, survivors_file, module, names_file, total, seed, tests, wall, command, commit, dirty, jobs, log,
 *sources) = sys.argv[1:]
total, wall = int(total), int(wall)
chosen = set(Path(names_file).read_text().split())
status, durations, path_of = {}, {}, {}
for path in walk_mutatable_files():
    meta = json.loads(Path("mutants", f"{path}.meta").read_text())
    for name, code in meta["exit_code_by_key"].items():
        if name in chosen:
            status[name], path_of[name] = status_by_exit_code[code], path
            durations[name] = meta["durations_by_key"].get(name)
counts = Counter(status.values())
run = len(status)


def function_start(path: Path, name: str) -> int | None:
    """First line (decorators included) of the function a mutant key names, in the original source."""
    mangled = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]   # x_func or xǁClassǁmethod
    cls, func = mangled.split("ǁ")[1:] if mangled.startswith("xǁ") else (None, mangled[2:])
    tree = ast.parse(path.read_text())
    scope = tree.body
    if cls:
        scope = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    for node in scope:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            return min([node.lineno] + [d.lineno for d in node.decorator_list])
    return None


survivors, lines = [], []
for name in sorted(n for n, s in status.items() if s != "killed"):
    path = path_of[name]
    diff = get_diff_for_mutant(name, path=path)
    where = str(path)
    hunk = re.search(r"^@@ -(\d+)", diff, re.M)
    start = function_start(Path(path), name)
    if hunk and start:
        line = int(hunk.group(1))   # line of the function's text where the hunk starts; count to the first '-'
        for text in diff[hunk.end():].split("\n")[1:]:
            if text.startswith("-"):
                break
            line += text.startswith(" ")
        where = f"{path}:{start + line - 1}"
    change = [l for l in diff.split("\n") if l[:1] in "+-" and not l.startswith(("+++", "---"))]
    survivors.append({"mutant": name, "status": status[name], "where": where,
                      "change": " / ".join(l.strip() for l in change)})
    lines += [f"# {name}: {status[name]} at {where}", diff, ""]

sampled = run < total
times = [d for d in durations.values() if d]
rate = re.findall(r"([\d.]+) mutations/second", Path(log).read_text())
entry = {
    "module": module,
    "sources": sources,
    "tests": tests.split(),
    "tool": "mutmut 3.8.1",
    "command": command,
    "date": datetime.date.today().isoformat(),
    "commit": commit,
    "src_or_tests_modified_since_commit": dirty == "true",
    "jobs": int(jobs),
    "mutants_generated": total,
    "mutants_run": run,
    "sample": {"of": total, "size": run, "seed": int(seed)} if sampled else None,
    "killed": counts["killed"],
    "survived": counts["survived"],
    "timeout": counts["timeout"],
    "no_tests": counts["no tests"],
    "other": {k: v for k, v in counts.items() if k not in ("killed", "survived", "timeout", "no tests")},
    "score": round(counts["killed"] / run, 4) if run else None,
    "score_text": f"{counts['killed']}/{run} killed"
                  + (f" (a seeded sample of {run} of {total} mutants, seed {seed})" if sampled else " (all mutants)"),
    "wall_seconds": wall,
    "seconds_per_mutant_wall": round(wall / run, 2) if run else None,
    "seconds_per_mutant_test_run": round(sum(times) / len(times), 2) if times else None,
    "mutmut_mutations_per_second": float(rate[-1]) if rate else None,
    "not_killed": survivors,
}
results = json.loads(Path(out).read_text()) if Path(out).exists() else {}
results[module] = entry
Path(out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
Path(survivors_file).write_text(f"# {module}: {entry['score_text']}; command: {command}; date {entry['date']}\n\n"
                                + "\n".join(lines))
print(f"   score {entry['score_text']}: survived {counts['survived']}, timeout {counts['timeout']}, "
      f"no tests {counts['no tests']}, other {entry['other'] or 0}; {wall} s wall, "
      f"{entry['seconds_per_mutant_wall']} s per mutant")
EOF
done

[[ $ESTIMATE -eq 1 ]] || echo "results: ${OUT#"$ROOT"/}; not-killed mutants: ${SURVIVORS#"$ROOT"/}/"
if [[ ${#FAILED[@]} -gt 0 ]]; then echo "failed: ${FAILED[*]}" >&2; exit 1; fi
