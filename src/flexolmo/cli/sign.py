"""`flexolmo sign`: sign an existing expert package (its owner) or merged model (the coordinator).

A package is verified completely first, and must carry the key's own name. A merged model must be the
version its merge log last wrote and, with --trusted-keys, already signed by the coordinator as it is now (a
signature is renewed, never put on weights the coordinator did not write); without --trusted-keys a warning
says the weights were not authenticated. The signature goes to PATH/model.sig and covers every other file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command, add_trusted_keys_flag, trusted_keys


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="sign an expert package or merged model with your key",
                         description=__doc__)
    parser.add_argument("path", type=Path, help="expert package or merged model directory")
    parser.add_argument("--sign-key", required=True, type=Path, help="your private key (NAME.key)")
    add_trusted_keys_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.coordinator.artefacts import sign_artefact
    from flexolmo.core.progress import announce_output

    signer = sign_artefact(args.path, args.sign_key, trusted_keys(args))
    announce_output(f"signature by '{signer.name}'", args.path / "model.sig")
    return 0
