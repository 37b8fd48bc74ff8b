"""`flexolmo init-router`: the coordinator computes the anchor's public router rows from public text.

Anchors made by `flexolmo pretrain` already have them; run this once on any other supported checkpoint before
publishing it. It changes the anchor's fingerprint, so do it before owners start training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_data_flags, path_list


def register(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="add public router rows to an anchor (coordinator, once)",
                                   description=__doc__)
    parser.add_argument("--anchor", required=True, help="anchor directory (modified in place)")
    parser.add_argument("--data", nargs="+", required=True, help="public text files")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=256, help="public sequences to average")
    parser.add_argument("--device", default="cpu")
    add_data_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.router_init import compute_public_rows

    fingerprint = compute_public_rows(Path(args.anchor), path_list(args.data), args.seq_len, args.sequences,
                                      args.text_field, args.device)
    print(f"public router rows written; anchor fingerprint is now {fingerprint}")
    return 0
