"""`flexolmo eval`: held-out bits per byte, loss and perplexity per domain, plus routing shares for MoE models.

Each `--data` file is a domain named after the file (`code.heldout.jsonl.gz` is `code`); `NAME=FILE` names it
yourself, and files given under one name are scored together. Every document of each file is scored by default
(`--split all`: you pass text that is already held out, such as the demo's `*.heldout.jsonl.gz`); `--split
heldout` scores only the documents that `train-expert` held out of a training file (its 5% hash split). A
domain with fewer than 4,096 scored tokens gets a warning.

Example:
  flexolmo eval --model runs/demo/models/flexolmo_untuned \\
      --data data/demo/code.heldout.jsonl.gz data/demo/legal.heldout.jsonl.gz --json runs/eval.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import (
    add_command,
    add_data_flag,
    add_data_flags,
    add_device_flags,
    add_exclude_flag,
    add_json_flag,
    add_router_bias_flag,
    json_output,
    model_title,
    trusted_keys,
    write_json_output,
)
from flexolmo.cli.config_flags import add_config_flags, config_values

# The scoring settings whose flags come from `EvalSettings` (device, dtype and text field are shared flags).
EVAL_FIELDS = ("split", "context_tokens", "seq_len", "batch_size", "max_sequences")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="score a model on held-out text per domain", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (dense or merged)")
    add_data_flag(parser, metavar="[NAME=]FILE",
                  help="text files, one domain each (named after the file unless NAME= is given)")
    add_exclude_flag(parser)
    add_router_bias_flag(parser)
    from flexolmo.evaluation.scoring import EvalSettings

    add_config_flags(parser, EvalSettings, EVAL_FIELDS)
    add_device_flags(parser)
    add_json_flag(parser, help="write the results as JSON to this file")
    add_data_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import print_table
    from flexolmo.evaluation.scoring import evaluate_path, parse_domains

    target = json_output(args)
    settings = eval_settings(args)
    result = evaluate_path(Path(args.model), parse_domains(args.data), settings, args.exclude, trusted_keys(args),
                           args.router_bias)
    rows = [[name, s.bits_per_byte, s.loss, s.perplexity, f"{s.tokens:,}", f"{s.bytes:,}"]
            for name, s in result.domains.items()]
    title = model_title(args)
    print_table(title, ["domain", "bits/byte", "loss", "perplexity", "tokens", "bytes"], rows)
    routed = {name: s.routing for name, s in result.domains.items() if s.routing}
    if routed:
        experts = next(iter(routed.values()))["experts"]
        print_table("share of tokens routed to each expert (mean over layers; every token goes to top-k experts, "
                    "so a row sums to top-k), and the kept routing mass (softmax weight of the top-k before any "
                    "renormalisation: mean, and the 5th percentile of the lowest layer)",
                    ["domain", *experts, "sum", "kept mass", "kept mass p5"],
                    [[name, *[r["mean_share"][e] for e in experts], sum(r["mean_share"].values()),
                      r["kept_mass"]["mean"], r["kept_mass"]["lowest_layer_p5"]] for name, r in routed.items()])
    write_json_output(target, result.as_dict(), "results")
    return 0


def eval_settings(args: argparse.Namespace):
    """The `EvalSettings` the parsed flags describe."""
    from flexolmo.evaluation.scoring import EvalSettings

    return EvalSettings(**config_values(args, EVAL_FIELDS), text_field=args.text_field, device=args.device,
                        dtype=args.dtype)
