"""`flexolmo init-router`: the coordinator computes the anchor's public router rows from public text.

Anchors made by `flexolmo pretrain` already have them; run this once on any other supported checkpoint before
publishing it. flexolmo never downloads: fetch a released checkpoint first, for example with huggingface_hub's
CLI, `hf download allenai/OLMo-2-0425-1B --local-dir OLMo-2-0425-1B`. The rows are part of the anchor's
fingerprint, so do this before owners start training: recomputing them later (`--force`) orphans every expert
package trained on the anchor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import (
    add_command,
    add_data_flags,
    add_device_flags,
    path_list,
    torch_dtype,
)
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.model.router_init import PublicRowSettings

PUBLIC_ROW_FIELDS = ("seq_len", "sequences")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="add public router rows to an anchor (coordinator, once)",
                         description=__doc__)
    parser.add_argument("--anchor", required=True, help="anchor directory (modified in place)")
    parser.add_argument("--public-data", nargs="+", required=True, metavar="FILE", help="public text files")
    add_config_flags(parser, PublicRowSettings, PUBLIC_ROW_FIELDS)
    parser.add_argument("--force", action="store_true",
                        help="replace existing rows (changes the fingerprint: packages trained on the anchor stop "
                             "verifying)")
    add_device_flags(parser)
    add_data_flags(parser)
    parser.set_defaults(run=run)


def public_row_settings(args: argparse.Namespace) -> PublicRowSettings:
    """The `PublicRowSettings` the parsed flags describe."""
    return PublicRowSettings(**config_values(args, PUBLIC_ROW_FIELDS))


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import console
    from flexolmo.model.router_init import compute_public_rows

    settings = public_row_settings(args)
    before, after = compute_public_rows(Path(args.anchor), path_list(args.public_data), settings.seq_len,
                                        settings.sequences, args.text_field, args.device, torch_dtype(args.dtype),
                                        args.force)
    print(f"public router rows written to {args.anchor}; its fingerprint is now {after}")
    if before is not None and before != after:
        console.print(f"[yellow]note:[/] the fingerprint was {before}; expert packages trained on that one no "
                      "longer verify or merge against this anchor", soft_wrap=True, highlight=False)
    return 0
