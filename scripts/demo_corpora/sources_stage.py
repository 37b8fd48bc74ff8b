"""The sources stage: each domain's readers, cleaned, deduplicated and subsampled, split into raw
train and held-out files, plus sources.json."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from .attribution import source_record
from .files import jsonl_gz_bytes, write_atomic
from .readers.biomedical import go_docs, hpo_docs
from .readers.code import stdlib_docs
from .readers.legal import debian_license_docs, scancode_docs
from .readers.literature import bigtxt_docs, kjv_docs
from .readers.math import setmm_docs
from .readers.public import foldoc_docs, wikipedia_docs, wordnet_docs
from .settings import BUDGETS, DOMAINS, HELDOUT_PERMILLE, MIN_DOC_CHARS
from .text import clean, hash_bucket, order_key, select_budget


def domain_sources(domain: str, args: argparse.Namespace) -> list[tuple[str, Callable[[], list[str]]]]:
    """(source name, reader) pairs for a domain, in the order their documents are numbered."""
    sp = args.site_packages
    if domain == "public":
        return [("wikipedia", lambda: wikipedia_docs(sp)), ("wordnet", wordnet_docs), ("foldoc", foldoc_docs)]
    if domain == "code":
        return [("stdlib", lambda: stdlib_docs(args.stdlib))]
    if domain == "math":
        return [("setmm", setmm_docs)]
    if domain == "legal":
        return [("debian", debian_license_docs), ("scancode", lambda: scancode_docs(sp))]
    if domain == "biomedical":
        return [("go", lambda: go_docs(args.go_sqlite)), ("hpo", lambda: hpo_docs(sp))]
    if domain == "literature":
        works: dict[str, list[str]] = {}

        def work(name: str) -> list[str]:
            if not works:
                works.update(bigtxt_docs(sp))  # one read of big.txt serves both novels
            return works[name]

        return [("holmes", lambda: work("holmes")), ("tolstoy", lambda: work("tolstoy")), ("kjv", kjv_docs)]
    raise ValueError(domain)


def _dedup_key(text: str) -> str:
    """Exact duplicates up to re-wrapping: the same licence or chunk laid out with other line breaks."""
    return " ".join(text.split())


def build_domain(domain: str, args: argparse.Namespace) -> dict[str, list[dict[str, str]]]:
    """Read, clean, dedup and subsample every source of a domain, then split it into train and held-out."""
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for source, reader in domain_sources(domain, args):
        texts = []
        for text in reader():
            text = clean(text)
            key = _dedup_key(text)
            if len(text) < MIN_DOC_CHARS or key in seen:
                continue
            seen.add(key)
            texts.append(text)
        for n, text in enumerate(select_budget(texts, BUDGETS[source], salt=f"select:{source}:")):
            rows.append({"id": f"{domain}-{source}-{n}", "text": text, "source": source})
    rows.sort(key=order_key)
    split: dict[str, list[dict[str, str]]] = {"train": [], "heldout": []}
    for row in rows:
        split["heldout" if hash_bucket(row["text"]) < HELDOUT_PERMILLE[domain] else "train"].append(row)
    return split


def build_sources(args: argparse.Namespace) -> None:
    """The sources stage: every requested domain's raw train/held-out files and its sources.json entry."""
    args.raw.mkdir(parents=True, exist_ok=True)
    record_path = args.raw / "sources.json"
    # Building a subset keeps the other domains' existing entries.
    record = json.loads(record_path.read_text()) if record_path.exists() else {"domains": {}}
    for domain in args.domains:
        split = build_domain(domain, args)
        for name, rows in split.items():
            write_atomic(args.raw / f"{domain}.{name}.jsonl.gz", jsonl_gz_bytes(rows))
        print(
            f"{domain:11s} raw train {len(split['train']):5d} docs "
            f"{sum(len(r['text']) for r in split['train']):>10,} chars | "
            f"heldout {len(split['heldout']):4d} docs {sum(len(r['text']) for r in split['heldout']):>9,} chars",
            flush=True,
        )
    fresh = source_record(args, args.domains)
    record["python"] = fresh["python"]
    record["domains"] = {d: ({**record["domains"], **fresh["domains"]})[d] for d in DOMAINS
                         if d in record["domains"] or d in fresh["domains"]}
    write_atomic(record_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
