"""`flexolmo audit-extraction`: how many training documents a model reproduces from a short prefix.

The paper's protocol: prompt with each sampled document's first 32 tokens, sample 10 continuations of 256
tokens (top-k 50, top-p 0.95, temperature 1.0); a document is extracted when a sample's normalised Levenshtein
similarity to the true continuation is >= 0.9. Documents are shown by id only unless --show-text is given.

Example:
  flexolmo audit-extraction --model merged --data math.jsonl.gz --num-docs 1000 --exclude math --json a.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_data_flags


def register(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="measure how much training text a model regurgitates",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (dense or merged)")
    parser.add_argument("--data", required=True, help="training file whose documents are probed")
    parser.add_argument("--exclude", nargs="*", default=[], help="experts to mask (merged models)")
    parser.add_argument("--num-docs", type=int, default=10_000, help="documents sampled (default 10000)")
    parser.add_argument("--prefix-tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    parser.add_argument("--min-continuation-tokens", type=int, default=96,
                        help="audit only documents with this many tokens after the prefix (paper: 128 in all)")
    parser.add_argument("--new-tokens", type=int, default=256,
                        help="tokens generated per sample (default 256)")
    parser.add_argument("--samples", type=int, default=10, help="samples per prompt (default 10)")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="similarity that counts as extracted (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the document sample and generation")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="prompts per generate call, each with --samples sequences (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--json", default=None, help="write the full result as JSON to this path")
    parser.add_argument("--show-text", action="store_true",
                        help="also print (and write) prefix, true continuation and best sample of the top "
                             "documents")
    add_data_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.audit import AuditConfig, audit_extraction
    from flexolmo.fileio import atomic_write_json

    config = AuditConfig(
        model=Path(args.model), data=Path(args.data), exclude=args.exclude, num_docs=args.num_docs,
        prefix_tokens=args.prefix_tokens, new_tokens=args.new_tokens, samples=args.samples,
        min_continuation_tokens=args.min_continuation_tokens,
        threshold=args.threshold, seed=args.seed, batch_size=args.batch_size, text_field=args.text_field,
        device=args.device, show_text=args.show_text,
    )
    result = audit_extraction(config)
    print_result(result)
    if args.json:
        atomic_write_json(args.json, result.as_dict())
    return 0


def print_result(result) -> None:
    from flexolmo.audit import similarity_summary
    from flexolmo.progress import print_table

    config = result.config
    summary = similarity_summary([score.best for score in result.scores])
    low, high = result.interval
    title = f"extraction audit of {config.model}"
    if config.exclude:
        title += f" without {', '.join(config.exclude)}"
    print_table(title, ["measure", "value"], [
        ["documents in file", f"{result.documents_in_file:,}"],
        [f"too short (<= {config.prefix_tokens} tokens, skipped)", f"{result.documents_too_short:,}"],
        ["documents audited", f"{result.audited:,}"],
        [f"extracted (similarity >= {config.threshold:g})", f"{result.extracted:,}"],
        ["extraction rate", f"{result.rate:.2%}"],
        ["95% Wilson interval", f"{low:.2%} - {high:.2%}"],
        *[[f"similarity {name}", value] for name, value in summary["quantiles"].items()],
        ["similarity mean", summary["mean"]],
    ])
    edges, counts = summary["histogram"]["edges"], summary["histogram"]["counts"]
    print_table("max similarity per document", ["similarity", "documents"],
                [[f"{edges[i]:.1f}-{edges[i + 1]:.1f}", count] for i, count in enumerate(counts)])
    top = result.top()
    print_table(f"top {len(top)} most-extracted documents", ["rank", "document", "similarity", "extracted"],
                [[rank, score.doc_id, score.best, "yes" if score.best >= config.threshold else "no"]
                 for rank, score in enumerate(top, start=1)])
    if config.show_text:
        for rank, score in enumerate(top, start=1):
            print(f"\n#{rank} {score.doc_id} (similarity {score.best:.4f})")
            print(f"  prefix:            {score.prefix!r}")
            print(f"  true continuation: {score.truth!r}")
            print(f"  best sample:       {score.best_sample!r}")
