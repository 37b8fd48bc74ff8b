"""`flexolmo verify`: exit 0 when a package or merged model checks out, else 1 and one line saying why.

A package (with --anchor): every file, tensor and manifest field, and that it was trained on that anchor; with
--trusted-keys also that the key of its own name signed it. A merged model: every expert slot against the
model's record, the files against its merge log, and with --trusted-keys the coordinator's signature.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command, add_trusted_keys_flag, trusted_keys


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="check a package or merged model is intact and authentic",
                         description=__doc__)
    parser.add_argument("path", type=Path, help="expert package or merged model directory")
    parser.add_argument("--anchor", type=Path, default=None, help="anchor directory a package should belong to")
    parser.add_argument("--packages", nargs="+", type=Path, default=None, metavar="DIR",
                        help="with a merged model: your own expert packages; each must be the slot of its name, "
                             "bit for bit (a member's check that nobody swapped, scaled or renamed its expert)")
    add_trusted_keys_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.coordinator.artefacts import check_member_slot, is_merged_model, verify_merged_model

    trusted = trusted_keys(args)
    if is_merged_model(args.path):
        result = verify_merged_model(args.path, trusted)
        if result["signer"]:
            signed = f", signed by '{result['signer'].name}'; history: {result['history'].describe()}"
        else:
            signed = " (signature and history not checked: pass --trusted-keys)"
        print(f"ok: {args.path} holds the {len(result['experts'])} experts its record names, unchanged since its "
              f"last of {result['operations']} logged operations{signed}")
        for package in args.packages or ():
            slot = check_member_slot(args.path, package, trusted)
            print(f"ok: {slot['name']} is slot {slot['slot']} of {args.path}, its FFN weights bit for bit those of "
                  f"{package}, its router row {slot['router']}")
        return 0
    if args.packages:
        from flexolmo.core.errors import PackageError

        raise PackageError(f"--packages checks your experts inside a merged model; {args.path} is not one")
    package = verify_package(args.path, args.anchor, trusted)
    signed = f", signed by '{package.signer.name}'" if package.signer else " (not authenticated: pass --trusted-keys)"
    print(f"ok: {package.name} is intact and was trained on {args.anchor}{signed}")
    return 0


def verify_package(path: Path, anchor: Path | None, trusted):
    from flexolmo.coordinator.inspection import check_is_package
    from flexolmo.core.errors import PackageError
    from flexolmo.model.anchor import anchor_family, compute_fingerprint, read_config
    from flexolmo.owner.package import load_package

    check_is_package(path)
    if anchor is None:
        raise PackageError("--anchor is required to verify a package: the anchor it should have been trained on")
    config = read_config(anchor)
    anchor_family(config, anchor)
    return load_package(path, compute_fingerprint(anchor), config, with_tensors=False, trusted_keys=trusted)
