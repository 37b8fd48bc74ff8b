"""`flexolmo inspect`: what an artefact flexolmo makes holds: an expert package (its manifest, never any training
text: there is none in it), an anchor (family, fingerprint, public router rows, dtype, parameters) or a merged
model (experts, top-k, format, dtype, the anchor it was built on)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command, add_json_flag, json_output, write_json_output


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="describe a package, an anchor or a merged model",
                         description=__doc__)
    parser.add_argument("path", help="expert package, anchor or model directory")
    add_json_flag(parser, "everything recorded, as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.coordinator.inspection import describe
    from flexolmo.core.progress import print_fields, print_table

    target = json_output(args)
    description = describe(Path(args.path))
    if target is not None:
        write_json_output(target, description.record, "description")
        return 0
    print_fields(f"{description.kind}: {description.path}", description.fields)
    for table in description.tables:
        print_table(table.title, table.columns, table.rows)
    return 0
