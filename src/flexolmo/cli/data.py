"""`flexolmo data`: checks on data files before they are used. Sub-commands:

- `overlap`: how much of each held-out file also occurs in the training files (exact N-character strings), per
  file and for the worst documents (named by id, never shown). A report: it exits 0 whatever the overlap.

  flexolmo data overlap --train data/demo/code.train.jsonl.gz data/demo/legal.train.jsonl.gz \\
      --heldout data/demo/code.heldout.jsonl.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import (
    HelpFormatter,
    add_command,
    add_data_flags,
    add_json_flag,
    json_output,
    path_list,
    write_json_output,
)
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.data.overlap import OverlapSettings

OVERLAP_FIELDS = ("chars", "top")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="check data files (overlap between held-out and training text)",
                         description=__doc__)
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True,
                                     help="what to check")
    overlap = commands.add_parser(
        "overlap", formatter_class=HelpFormatter, help="share of held-out characters found in training text",
        description="Share of each held-out file's characters that lie inside an N-character string which "
                    "also occurs in a training document (exact code points; windows never cross documents; "
                    "runs of one repeated character are ignored). See flexolmo.data.overlap for the details.")
    overlap.add_argument("--train", nargs="+", required=True, metavar="FILE",
                         help="training files (.jsonl/.jsonl.gz/.parquet/.txt)")
    overlap.add_argument("--heldout", nargs="+", required=True, metavar="FILE",
                         help="held-out (or validation) files, each checked against all training files")
    add_config_flags(overlap, OverlapSettings, OVERLAP_FIELDS)
    add_json_flag(overlap, help="also write the full report (ids and counts, no text) as JSON to this file")
    add_data_flags(overlap)
    overlap.set_defaults(run=run_overlap)


def overlap_settings(args: argparse.Namespace) -> OverlapSettings:
    """The `OverlapSettings` the parsed flags describe."""
    return OverlapSettings(**config_values(args, OVERLAP_FIELDS))


def run_overlap(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import print_table
    from flexolmo.data.overlap import measure_overlap

    target = json_output(args)
    heldout = path_list(args.heldout)
    settings = overlap_settings(args)
    report = measure_overlap(path_list(args.train), heldout, chars=settings.chars, top=settings.top,
                             text_field=args.text_field)
    folder, names = _short_names(heldout)
    print_table(
        f"held-out characters inside a {report.chars}-character string found in {len(report.train_files)} "
        f"training file(s) ({report.train_characters:,} characters)" + (f"; held-out files in {folder}/"
                                                                         if folder else ""),
        ["held-out file", "documents", "characters", "share", "docs >50%"],
        [[name, f"{f.documents:,}", f"{f.characters:,}", f"{100 * f.share:.2f}%", f"{f.documents_over_half:,}"]
         for name, f in zip(names, report.files)],
    )
    worst = [[name, d.doc_id, f"{d.characters:,}", f"{100 * d.share:.1f}%"]
             for name, f in zip(names, report.files) for d in f.worst]
    if worst:
        print_table(f"most shared documents (up to {settings.top} per file)",
                    ["held-out file", "id", "characters", "share"], worst)
    write_json_output(target, report.as_dict(), "overlap report")
    return 0


def _short_names(paths: list[Path]) -> tuple[str | None, list[str]]:
    """File names alone when all files sit in one other folder (so a table fits a terminal), else the paths."""
    parents = {path.parent for path in paths}
    names = [path.name for path in paths]
    if len(parents) == 1 and len(set(names)) == len(names) and str(paths[0].parent) != ".":
        return str(paths[0].parent), names
    return None, [str(path) for path in paths]
