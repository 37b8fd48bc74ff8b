"""`flexolmo add`: a late joiner's expert is added to an existing merged model (written to a new directory).

The new packages are verified, authenticated with --trusted-keys and pass the admission checks like at merge;
the model's existing experts are checked against their recorded digests as they are copied. An expert whose
owner opted out earlier (its removal is in the model's log) joins again only with --readmit NAME.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command, path_list
from flexolmo.cli.config_flags import add_config_flags
from flexolmo.cli.trust_flags import add_coordinator_flags, coordinator_trust
from flexolmo.model.merged_format import MergeSettings

# `MergeSettings` fields an addition takes: the model's dtype is kept.
ADD_FIELDS = ("top_k", "shard_gb")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="add expert packages to a merged model", description=__doc__)
    parser.add_argument("--model", required=True, help="merged model directory")
    parser.add_argument("--packages", nargs="+", required=True, metavar="DIR", help="expert package directories")
    parser.add_argument("--out", required=True, help="output model directory (must not exist)")
    add_config_flags(parser, MergeSettings, ADD_FIELDS)
    parser.add_argument("--readmit", nargs="+", default=[], metavar="NAME",
                        help="experts whose owners opted out earlier (removed, as the model's log says) and consent "
                             "to join again; the log marks them readmitted")
    add_coordinator_flags(parser, joining=True)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.cli.merge import merge_settings, print_experts
    from flexolmo.coordinator.merge import add_experts

    settings = merge_settings(args, ADD_FIELDS)
    metadata = add_experts(Path(args.model), path_list(args.packages), Path(args.out), settings.top_k,
                           shard_bytes=settings.shard_bytes(), trust=coordinator_trust(args), readmit=args.readmit)
    print_experts(Path(args.out), metadata)
    return 0
