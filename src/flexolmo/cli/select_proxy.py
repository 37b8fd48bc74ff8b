"""`flexolmo select-proxy`: a data owner picks the public documents most like its data, for router tuning.

A classifier trained here, on your machine (your documents against public ones), scores the public text; the
most owner-like documents, a small fraction of your data's size, are written as SHA-256 hashes of their text.
The file holds no private text; send it to the coordinator with your expert package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command, add_data_flags, path_list


def register(subparsers, name: str) -> None:
    from flexolmo.owner.proxy import DEFAULT_EMBEDDER, DEFAULT_FRACTION, EMBEDDERS

    parser = add_command(subparsers, name, help="choose public proxy documents like your data (owner, for router "
                                              "tuning)", description=__doc__)
    parser.add_argument("--data", nargs="+", required=True, help="your private training text files")
    parser.add_argument("--public-data", nargs="+", required=True, metavar="FILE",
                        help="the coordinator's public text files")
    parser.add_argument("--name", required=True, help="your expert's name (the proxies tune its router row)")
    parser.add_argument("--out", required=True, help="proxy file to write (JSON; must not exist)")
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER, choices=sorted(EMBEDDERS),
                        help="document features: the anchor's own hidden states, or all-MiniLM-L6-v2")
    parser.add_argument("--anchor", default=None, help="anchor directory (needed by --embedder anchor)")
    parser.add_argument("--max-documents", type=int, default=1000,
                        help="documents of yours, and as many public ones, to fit the classifier")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens of each document the embedder reads")
    parser.add_argument("--fraction", type=float, default=DEFAULT_FRACTION,
                        help="size of the proxy set as a share of your training text's bytes")
    parser.add_argument("--device", default="cpu", help="torch device for the embedder: cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the classifier")
    add_data_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import announce_output, print_table
    from flexolmo.owner.proxy import ProxyConfig, select_proxies

    config = ProxyConfig(data=path_list(args.data), public=path_list(args.public_data), name=args.name,
                         out=Path(args.out), embedder=args.embedder,
                         anchor=Path(args.anchor) if args.anchor else None, max_documents=args.max_documents,
                         max_tokens=args.max_tokens, fraction=args.fraction, device=args.device, seed=args.seed,
                         text_field=args.text_field)
    record = select_proxies(config)
    selection = record["selection"]
    print_table(f"proxies for '{record['name']}'", ["embedder", "held-out accuracy", "ROC AUC", "candidates",
                                                   "proxies", "bytes"],
                [[selection["embedder"], selection["heldout_accuracy"], selection["heldout_roc_auc"],
                  f"{selection['public_candidates']:,}", selection["selected_documents"],
                  f"{selection['selected_bytes']:,}"]])
    announce_output("proxy file", config.out)
    return 0
