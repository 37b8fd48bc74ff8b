"""`flexolmo select-proxy`: a data owner picks the public documents most like its data, for router tuning.

A classifier trained here, on your machine (your documents against public ones), scores the public text; the
most owner-like documents, a small fraction of your data's size, are written as SHA-256 hashes of their text.
The file holds no private text; send it to the coordinator with your expert package. Every flag is a field of
`ProxyConfig`, with its default.
"""

from __future__ import annotations

import argparse

from flexolmo.cli.common import add_command
from flexolmo.cli.config_flags import add_config_flags, config_values

# The flags, every one a `ProxyConfig` field (`public` is `--public-data`, as on every command), in `--help`
# order.
PROXY_FIELDS = ("data", "public", "name", "out", "embedder", "anchor", "max_documents", "max_tokens", "fraction",
                "device", "seed", "text_field")


def register(subparsers, name: str) -> None:
    from flexolmo.owner.proxy import EMBEDDERS, ProxyConfig

    parser = add_command(subparsers, name, help="choose public proxy documents like your data (owner, for router "
                                              "tuning)", description=__doc__)
    add_config_flags(parser, ProxyConfig, PROXY_FIELDS, required=("data", "public", "name", "out"),
                     choices={"embedder": sorted(EMBEDDERS)})
    parser.set_defaults(run=run)


def proxy_config(args: argparse.Namespace):
    """The `ProxyConfig` the parsed flags describe."""
    from flexolmo.owner.proxy import ProxyConfig

    return ProxyConfig(**config_values(args, PROXY_FIELDS))


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import announce_output, print_table
    from flexolmo.owner.proxy import select_proxies

    config = proxy_config(args)
    record = select_proxies(config)
    selection = record["selection"]
    print_table(f"proxies for '{record['name']}'", ["embedder", "held-out accuracy", "ROC AUC", "candidates",
                                                   "proxies", "bytes"],
                [[selection["embedder"], selection["heldout_accuracy"], selection["heldout_roc_auc"],
                  f"{selection['public_candidates']:,}", selection["selected_documents"],
                  f"{selection['selected_bytes']:,}"]])
    announce_output("proxy file", config.out)
    return 0
