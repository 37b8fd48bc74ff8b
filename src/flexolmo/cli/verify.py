"""`flexolmo verify`: exit 0 when a package is intact and was trained on the given anchor, else 1 and why."""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="check a package is intact and trained on an anchor",
                         description=__doc__)
    parser.add_argument("path", help="expert package directory")
    parser.add_argument("--anchor", required=True, help="anchor directory the package should belong to")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.anchor import anchor_family, compute_fingerprint, read_config
    from flexolmo.inspection import check_is_package
    from flexolmo.package import load_package

    check_is_package(Path(args.path))
    config = read_config(Path(args.anchor))
    anchor_family(config, args.anchor)
    package = load_package(Path(args.path), compute_fingerprint(args.anchor), config, with_tensors=False)
    print(f"ok: {package.name} is intact and was trained on {args.anchor}")
    return 0
