"""`flexolmo remove`: an owner opts out; writes a smaller checkpoint without its expert.

Names are resolved through the model's record, and each removed slot is checked against its recorded digest,
so a record with swapped names cannot remove another member's expert. The merge log keeps a line saying the
expert was removed (name and package digest, no manifest).
To withdraw an expert without rewriting the checkpoint, pass `--exclude NAME` to any command that runs a model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command
from flexolmo.cli.config_flags import add_config_flags
from flexolmo.cli.trust_flags import add_coordinator_flags, coordinator_trust
from flexolmo.model.merged_format import MergeSettings

# `MergeSettings` fields a removal takes: the top-k and dtype are the model's (a top-k above the experts left
# is lowered).
REMOVE_FIELDS = ("shard_gb",)


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="write a merged model without the named experts",
                         description=__doc__)
    parser.add_argument("--model", required=True, help="merged model directory")
    parser.add_argument("--exclude", nargs="+", required=True, metavar="NAME",
                        help="names of the experts to remove")
    parser.add_argument("--out", required=True, help="output model directory (must not exist)")
    add_config_flags(parser, MergeSettings, REMOVE_FIELDS)
    add_coordinator_flags(parser, joining=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.cli.merge import merge_settings, print_experts
    from flexolmo.coordinator.merge import remove_experts

    settings = merge_settings(args, REMOVE_FIELDS)
    metadata = remove_experts(Path(args.model), args.exclude, Path(args.out), shard_bytes=settings.shard_bytes(),
                              trust=coordinator_trust(args))
    print_experts(Path(args.out), metadata)
    return 0
