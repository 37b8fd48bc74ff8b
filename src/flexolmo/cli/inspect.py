"""`flexolmo inspect`: what an artefact flexolmo makes holds: an expert package (its manifest, never any training
text: there is none in it), an anchor (family, fingerprint, public router rows, dtype, parameters) or a merged
model (experts, top-k, format, dtype, the anchor it was built on)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexolmo.cli.common import add_command


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="describe a package, an anchor or a merged model",
                         description=__doc__)
    parser.add_argument("path", help="expert package, anchor or model directory")
    parser.add_argument("--json", action="store_true", help="print everything recorded, as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.coordinator.inspection import describe
    from flexolmo.core.progress import print_fields, print_table

    description = describe(Path(args.path))
    if args.json:
        print(json.dumps(description.record, indent=2))
        return 0
    print_fields(f"{description.kind}: {description.path}", description.fields)
    for table in description.tables:
        print_table(table.title, table.columns, table.rows)
    return 0
