"""`flexolmo history`: the merge log of a merged model, one line per operation that produced a version of it.

Each line: what was done, when, by whom (the coordinator's signing key), the experts added (name, package
digest, signer) or removed (name and package digest: an opt-out leaves no manifest), the experts and top-k
after it, and the digest of the version it wrote.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="show a merged model's merge log", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="merged model directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.errors import MergeError, TrustError
    from flexolmo.core.progress import console, print_table
    from flexolmo.trust.history import check_unchanged, read_history

    records = read_history(args.model)
    if not records:
        raise MergeError(f"{args.model}: no merge log; it is not a model merged by this flexolmo")

    def experts(entries: list[dict]) -> str:
        return ", ".join(f"{e['name']}@{(e.get('package_sha256') or '-')[:8]}"
                         + (f" (signed by {e['signer']['name']})" if e.get("signer") else "")
                         + (" (readmitted after opting out)" if e.get("readmitted") else "") for e in entries) or "-"

    rows = [[number, r["operation"], r["when"], (r.get("by") or {}).get("name", "unsigned"), experts(r["added"]),
             experts(r["removed"]), f"{len(r['experts'])} (top-{r['top_k']})", r["model_sha256"][:12]]
            for number, r in enumerate(records, start=1)]
    print_table(f"merge log of {args.model}", ["#", "operation", "when", "by", "added", "removed", "experts",
                                               "model digest"], rows)
    try:
        check_unchanged(args.model)
    except TrustError as error:
        console.print(f"[yellow]warning:[/] {error}")
    return 0
