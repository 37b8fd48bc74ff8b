"""`flexolmo inspect`: show an expert package's manifest (never any training text: there is none in it)."""

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
    from flexolmo.package import load_package
    from flexolmo.progress import print_table

    package = load_package(Path(args.path), with_tensors=False)
    manifest = package.manifest
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    training = manifest.get("training", {})
    dp = (manifest.get("privacy") or {}).get("dp")
    rows = [
        ["name", manifest["name"]],
        ["format version", manifest["format_version"]],
        ["anchor fingerprint", manifest["anchor"]["fingerprint"]],
        ["tensors", f"{len(manifest['tensors'])} ({sum(_numel(t['shape']) for t in manifest['tensors'].values()):,} values)"],
        ["tokens trained", f"{training.get('tokens', 0):,}"],
        ["token stream sha256", training.get("token_stream_sha256", "-")],
        ["held-out loss before -> after",
         f"{training.get('heldout_loss_before', float('nan')):.4f} -> {training.get('heldout_loss_after', float('nan')):.4f}"],
        ["differential privacy", "none" if not dp else f"epsilon {dp['epsilon']:.3g}, delta {dp['delta']:.3g}"],
        ["router row", _router_row(manifest.get("privacy", {}))],
        ["created", manifest.get("created", "-")],
        ["flexolmo version", manifest.get("versions", {}).get("flexolmo", "-")],
    ]
    print_table(str(package.path), ["field", "value"], rows)
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
