"""`flexolmo merge`: the coordinator merges the anchor and expert packages into one flex_olmo checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command, path_list


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="merge the anchor and expert packages into a FlexOlmo model",
                         description=__doc__)
    parser.add_argument("--anchor", required=True, help="anchor directory")
    parser.add_argument("--experts", nargs="*", default=[], help="expert package directories")
    parser.add_argument("--top-k", type=int, required=True, help="experts used per token at inference")
    parser.add_argument("--out", required=True, help="output model directory (must not exist)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="maximum size of one weight shard (GB)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.merge import merge

    metadata = merge(Path(args.anchor), path_list(args.experts), Path(args.out), args.top_k,
                     shard_bytes=int(args.shard_gb * 1024**3))
    print_experts(Path(args.out), metadata)
    return 0


def print_experts(out: Path, metadata: dict) -> None:
    from flexolmo.progress import announce_output, print_table

    rows = [[index, entry["name"], entry.get("source", "")] for index, entry in enumerate(metadata["experts"])]
    print_table(f"experts of the merged model (top-k {metadata['top_k']})", ["expert", "name", "source"], rows)
    announce_output("merged model", out)
