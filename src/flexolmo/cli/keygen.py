"""`flexolmo keygen`: a new signing key pair for a consortium member (an owner or the coordinator).

Writes DIR/NAME.key (private, mode 0600: keep it, never send it) and DIR/NAME.pub (send it to everyone who
verifies your packages or models). NAME is your expert's name: verifiers accept a package only when it is
signed by the key of its own name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="create a signing key pair (NAME.key private, NAME.pub public)",
                         description=__doc__)
    parser.add_argument("--name", required=True, help="the member's name (an owner's expert name)")
    parser.add_argument("--out", required=True, type=Path, help="directory for NAME.key and NAME.pub")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import announce_output
    from flexolmo.trust.signing import generate_key_pair

    private, public = generate_key_pair(args.name, args.out)
    announce_output("private key (keep it)", private)
    announce_output("public key (share it)", public)
    return 0
