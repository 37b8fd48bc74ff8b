"""`flexolmo withdraw NAME --coordinator URL --sign-key NAME.key`: take your expert out of the consortium now;
prints the coordinator's signed receipt naming the active-set version from which it is no longer used."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexolmo.cli.common import add_command


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="withdraw your expert from a consortium service",
                         description=__doc__)
    parser.add_argument("name", help="your expert's name")
    parser.add_argument("--coordinator", required=True, help="the service's URL")
    parser.add_argument("--sign-key", required=True, type=Path, help="your private key (NAME.key)")
    parser.add_argument("--receipt", type=Path, help="also write the signed receipt to this file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.service.client import ConsortiumClient

    receipt = ConsortiumClient(args.coordinator, args.sign_key).withdraw(args.name)
    if args.receipt:
        args.receipt.write_text(json.dumps(receipt, indent=1))
    print(json.dumps(receipt, indent=1))
    return 0
