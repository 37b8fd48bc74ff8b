"""`flexolmo eval`: held-out bits per byte, loss and perplexity per domain, plus routing shares for MoE models.

Every document of each file is scored by default (`--split all`: you pass text that is already held out, such
as the demo's `*.heldout.jsonl.gz`). `--split heldout` scores only the documents that `train-expert` held out of
a training file (its 5% hash split). A domain with fewer than 4,096 scored tokens gets a warning.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from flexolmo.cli.common import add_data_flags


def register(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="score a model on held-out text per domain", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (dense or merged)")
    parser.add_argument("--data", nargs="+", required=True, metavar="NAME=FILE",
                        help="domain name and file; repeat a name to give it several files")
    parser.add_argument("--exclude", nargs="*", default=[], help="experts to mask (merged models)")
    parser.add_argument("--split", default="all", choices=["all", "heldout"],
                        help="all: every document of the files; heldout: only the hash-held-out documents of a "
                             "training file")
    parser.add_argument("--context-tokens", type=int, default=0,
                        help="leading tokens of each window given as context and not scored")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-sequences", type=int, default=None, help="cap on sequences per domain")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    add_data_flags(parser)
    parser.set_defaults(run=run)


def parse_domains(values: list[str]) -> dict[str, list[Path]]:
    from flexolmo.errors import DataError

    domains: dict[str, list[Path]] = defaultdict(list)
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or not name or not file:
            raise DataError(f"--data expects NAME=FILE, got {value!r}")
        domains[name].append(Path(file))
    return dict(domains)


def run(args: argparse.Namespace) -> int:
    from flexolmo.evaluate import EvalSettings, evaluate_path
    from flexolmo.fileio import atomic_write_json
    from flexolmo.progress import print_table

    settings = EvalSettings(seq_len=args.seq_len, batch_size=args.batch_size, max_sequences=args.max_sequences,
                            split=args.split, text_field=args.text_field, device=args.device,
                            context_tokens=args.context_tokens)
    result = evaluate_path(Path(args.model), parse_domains(args.data), settings, args.exclude)
    rows = [[name, s.bits_per_byte, s.loss, s.perplexity, f"{s.tokens:,}", f"{s.bytes:,}"]
            for name, s in result.domains.items()]
    title = f"{args.model}" + (f" without {', '.join(args.exclude)}" if args.exclude else "")
    print_table(title, ["domain", "bits/byte", "loss", "perplexity", "tokens", "bytes"], rows)
    routed = {name: s.routing for name, s in result.domains.items() if s.routing}
    if routed:
        experts = next(iter(routed.values()))["experts"]
        print_table("share of tokens routed to each expert (mean over layers)", ["domain", *experts],
                    [[name, *[r["mean_share"][e] for e in experts]] for name, r in routed.items()])
    if args.json:
        atomic_write_json(args.json, result.as_dict())
    return 0
