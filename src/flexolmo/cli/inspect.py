"""`flexolmo inspect`: show an expert package's manifest and what it reveals about the owner's data (never any
training text: there is none in it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="show an expert package's manifest", description=__doc__)
    parser.add_argument("path", help="expert package directory")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.manifest import describe_disclosure
    from flexolmo.package import load_package
    from flexolmo.progress import print_table
    from flexolmo.trust.signing import SIGNATURE_FILE

    package = load_package(Path(args.path), with_tensors=False)
    manifest = package.manifest
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    training = manifest["training"]
    dp = manifest["privacy"]["dp"]
    rows = [
        ["name", manifest["name"]],
        ["format version", manifest["format_version"]],
        ["anchor fingerprint", manifest["anchor"]["fingerprint"]],
        ["tensors", f"{len(manifest['tensors'])} ({sum(_numel(t['shape']) for t in manifest['tensors'].values()):,} values)"],
        ["tokens trained", f"{training['tokens']:,}"],
        ["differential privacy", "none" if not dp else f"epsilon {dp['epsilon']:.3g}, delta {dp['delta']:.3g}"],
        ["router row", _router_row(manifest["privacy"])],
        ["signature", "present (check who signed with `flexolmo verify --trusted-keys`)"
         if (package.path / SIGNATURE_FILE).exists() else "none: anyone could have written this package"],
        ["created", manifest.get("created", "-")],
        ["flexolmo version", manifest.get("versions", {}).get("flexolmo", "-")],
    ]
    if training["heldout_loss_before"] is not None:
        rows.insert(5, ["held-out loss before -> after",
                        f"{training['heldout_loss_before']:.4f} -> {training['heldout_loss_after']:.4f}"])
    print_table(str(package.path), ["field", "value"], rows)
    print_table("what this manifest reveals about the owner's data", ["field", "value", "reveals"],
                [list(row) for row in describe_disclosure(manifest)])
    return 0


def _router_row(privacy: dict) -> str:
    """How the router row started, and whether that read private data outside any DP mechanism."""
    init = privacy.get("router_init", "-")
    if privacy.get("router_row_from_private_data"):
        return f"{init} (a statistic of the training data, not covered by DP)"
    releases = (privacy.get("dp") or {}).get("prior_releases") or []
    return f"{init} (released under DP, counted in epsilon)" if releases else init


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
