"""`flexolmo audit-extraction`: how many training documents a model reproduces from a short prefix.

The paper's protocol: prompt with each sampled document's first 32 tokens, sample 10 continuations of 256
tokens (top-k 50, top-p 0.95, temperature 1.0); a document is extracted when a sample's normalised Levenshtein
similarity to the true continuation is >= 0.9. Documents are shown by id only unless --show-text is given.

Example:
  flexolmo audit-extraction --model runs/demo/models/flexolmo_untuned --data data/demo/math.train.jsonl.gz \\
      --num-docs 1000 --exclude math --json runs/audit.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import (
    add_command,
    add_data_flag,
    add_data_flags,
    add_device_flags,
    add_exclude_flag,
    add_json_flag,
    json_output,
    path_list,
    trusted_keys,
    write_json_output,
)
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.evaluation.audit import AuditConfig

# The audit settings whose flags come from `AuditConfig` (model, data, exclusion, device, dtype and text field
# are the shared flags).
AUDIT_FIELDS = ("num_docs", "prefix_tokens", "min_continuation_tokens", "new_tokens", "samples", "threshold",
                "seed", "batch_size", "show_text")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="measure how much training text a model regurgitates",
                         description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (dense or merged)")
    add_data_flag(parser, help="training text files whose documents are probed")
    add_exclude_flag(parser)
    add_config_flags(parser, AuditConfig, AUDIT_FIELDS)
    add_device_flags(parser)
    add_json_flag(parser, help="write the full result as JSON to this file")
    add_data_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.evaluation.audit import audit_extraction

    target = json_output(args)
    config = audit_config(args)
    result = audit_extraction(config, trusted_keys(args))
    print_result(result)
    write_json_output(target, result.as_dict(), "audit result")
    return 0


def audit_config(args: argparse.Namespace) -> AuditConfig:
    """The `AuditConfig` the parsed flags describe."""
    return AuditConfig(model=Path(args.model), data=path_list(args.data), exclude=args.exclude,
                       **config_values(args, AUDIT_FIELDS), text_field=args.text_field, device=args.device,
                       dtype=args.dtype)


def print_result(result) -> None:
    from flexolmo.core.progress import print_table
    from flexolmo.evaluation.audit import similarity_summary

    config = result.config
    summary = similarity_summary([score.best for score in result.scores])
    low, high = result.interval
    title = f"extraction audit of {config.model}"
    if config.exclude:
        title += f" without {', '.join(config.exclude)}"
    print_table(title, ["measure", "value"], [
        ["documents in the files", f"{result.documents_in_file:,}"],
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
