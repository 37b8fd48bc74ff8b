"""`flexolmo merge`: the coordinator merges the anchor and expert packages into one mixture-of-experts
checkpoint, in the format of the anchor's family (flex_olmo, qwen2_moe or qwen3_moe).

Every package is verified completely (and, with --trusted-keys, authenticated) before anything is written;
the joining experts then pass the admission checks inside the merged model, the operation is logged in the
model's merge log, and with --sign-key the coordinator signs every file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command, path_list
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.cli.trust_flags import add_coordinator_flags, coordinator_trust
from flexolmo.model.merged_format import MergeSettings

# The flags of the merged checkpoint's settings; add and remove take those that apply to them.
MERGE_FIELDS = ("top_k", "shard_gb", "save_dtype")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="merge the anchor and expert packages into a FlexOlmo model",
                         description=__doc__)
    parser.add_argument("--anchor", required=True, help="anchor directory")
    parser.add_argument("--packages", nargs="+", required=True, metavar="DIR", help="expert package directories")
    parser.add_argument("--out", required=True, help="output model directory (must not exist)")
    add_config_flags(parser, MergeSettings, MERGE_FIELDS, required=("top_k",))
    add_coordinator_flags(parser, joining=True)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.coordinator.merge import merge

    settings = merge_settings(args, MERGE_FIELDS)
    trust = coordinator_trust(args, anchor_dir=Path(args.anchor))
    metadata = merge(Path(args.anchor), path_list(args.packages), Path(args.out), settings.top_k,
                     shard_bytes=settings.shard_bytes(), trust=trust, dtype=settings.save_dtype)
    print_experts(Path(args.out), metadata)
    return 0


def merge_settings(args: argparse.Namespace, fields: tuple[str, ...]) -> MergeSettings:
    """The `MergeSettings` the parsed flags of `fields` describe (the others keep their defaults)."""
    return MergeSettings(**config_values(args, fields))


def print_experts(out: Path, metadata: dict) -> None:
    """The experts of a model just written, with their signers, then where it went."""
    from flexolmo.core.progress import announce_output, print_table

    def signer(entry: dict) -> str:
        if entry.get("source") == "anchor":
            return "(anchor)"
        return entry["signer"]["name"] if entry.get("signer") else "not authenticated"

    rows = [[index, entry["name"], entry.get("source", ""), signer(entry), entry["slot_sha256"][:12]]
            for index, entry in enumerate(metadata["experts"])]
    print_table(f"{out} (top-k {metadata['top_k']} of {len(metadata['experts'])} experts)",
                ["expert", "name", "source", "signed by", "slot digest"], rows)
    announce_output("merged model", out)
