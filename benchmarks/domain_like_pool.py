"""A public pool that holds documents like the closed domains, for router tuning (the router-tuning study).

    apt-get install -y metamath-databases python3.11-doc
    (cd /tmp && apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb austen)
    .venv/bin/pip install rdata     # reads R's lazy-load database; used by this script only
    .venv/bin/python benchmarks/domain_like_pool.py --austen /tmp/austen --out runs/domain-pool/pool.jsonl.gz

The demo's public pool (the anchor's public sample: Wikipedia leads, WordNet, FOLDOC) holds almost nothing like
the owners' code, proofs, licences, abstracts or novels, so the proxies an owner picks from it are public text,
and router tuning on them teaches the router public text only (benchmarks/docs/router-tuning.md). The paper's
pool is a web mix that does hold each domain. This script adds, to the anchor's public sample, openly licensed
documents like four of the five closed domains from sources no shipped corpus uses:

- code-like: the Python 3.11 manual (Debian `python3.11-doc`, PSF-2.0; the code owner holds the standard
  library's source, not its manual);
- math-like: comments of the Metamath databases other than set.mm (`nf.mm`, `ql.mm`, `hol.mm`, `peano.mm`, in
  Debian `metamath-databases`, CC0; the math owner holds set.mm);
- legal-like: the `copyright` files of the Debian packages installed on this machine (`/usr/share/doc/*/copyright`;
  the legal owner holds `/usr/share/common-licenses` and ScanCode's licence texts);
- literature-like: Jane Austen's six novels (Debian `r-cran-janeaustenr`, public domain; the literature owner
  holds Conan Doyle, Tolstoy and the King James Bible);
- biomedical: none; no offline public source of definitions like GO's or HPO's was found, so the biomedical
  owner's proxies stay public text, a control inside the study.

Each source is cut into documents of at most --doc-chars characters at paragraph breaks, and --source-chars of
each domain are kept (documents in the order of their SHA-256, so the choice is fixed). Any document that shares
a 50-character passage with a shipped `*.validation` or `*.heldout` file of any domain is dropped, so tuning on
the pool cannot have seen evaluation text. Writes the pool (JSONL, `text` and `source`) and, beside it,
`pool_sources.json`: documents and characters per source, and how much of each is shared, at 50 characters,
with each owner's training text (the pool is public; an owner's private text may still quote it).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.fileio import atomic_write_bytes
from flexolmo.data.documents import iter_texts
from flexolmo.data.overlap import build_index, covered_masks
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, PUBLIC, shipped_data_dir

from common import argument_parser, write_results

METAMATH = Path("/usr/share/metamath/databases")
PYTHON_MANUAL = Path("/usr/share/info/python3.11.info.gz")
DEBIAN_DOCS = Path("/usr/share/doc")
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
OVERLAP_CHARS = 50


def chunks(text: str, limit: int) -> Iterator[str]:
    """`text` cut at blank lines into pieces of at most `limit` characters (a longer paragraph is cut hard)."""
    piece = ""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        while len(paragraph) > limit:
            yield paragraph[:limit]
            paragraph = paragraph[limit:]
        if piece and len(piece) + 2 + len(paragraph) > limit:
            yield piece
            piece = ""
        piece = f"{piece}\n\n{paragraph}" if piece else paragraph
    if piece:
        yield piece


def python_manual() -> Iterator[str]:
    """The manual's info nodes (separated by the 0x1f byte), without the info file's own header node."""
    yield from gzip.open(PYTHON_MANUAL, "rt", encoding="utf-8", errors="replace").read().split("\x1f")[1:]


def metamath_comments() -> Iterator[str]:
    for name in ("nf.mm", "ql.mm", "hol.mm", "peano.mm"):
        text = (METAMATH / name).read_text(encoding="utf-8", errors="replace")
        yield from (" ".join(comment.split()) for comment in re.findall(r"\$\((.*?)\$\)", text, re.S))


def debian_copyright_files() -> Iterator[str]:
    for path in sorted(DEBIAN_DOCS.glob("*/copyright")):
        yield path.read_text(encoding="utf-8", errors="replace")


def austen_novels(root: Path) -> list[str]:
    """The six novels from the R package's lazy-load database: an index of offsets, each object zlib-compressed
    behind a 4-byte length."""
    import zlib

    try:
        import rdata
    except ImportError:
        raise FlexOlmoError("reading the Austen novels needs `rdata`: .venv/bin/pip install rdata") from None
    base = root / AUSTEN_DATA
    if not base.with_suffix(".rdx").exists():
        raise FlexOlmoError(f"no janeaustenr data under {root}: extract r-cran-janeaustenr there (see --help)")

    def read(payload: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(payload))

    database = base.with_suffix(".rdb").read_bytes()
    with warnings.catch_warnings():  # rdata warns that a bare serialized object is "assumed RDS", which it is
        warnings.simplefilter("ignore", UserWarning)
        index = read(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
        return ["\n".join(str(line) for line in read(zlib.decompress(database[int(start) + 4: int(start) + int(size)])))
                for _, (start, size) in sorted(index["variables"].items())]


def source_documents(texts: Iterator[str], doc_chars: int, budget: int) -> list[str]:
    """Every chunk of the source's texts, then the first of them in SHA-256 order up to `budget` characters."""
    pieces = [piece for text in texts for piece in chunks(text, doc_chars) if len(piece) >= 200]
    pieces.sort(key=lambda piece: hashlib.sha256(piece.encode()).hexdigest())
    kept, total = [], 0
    for piece in pieces:
        if total >= budget:
            break
        kept.append(piece)
        total += len(piece)
    return kept


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--austen", type=Path, required=True, help="where r-cran-janeaustenr was extracted")
    parser.add_argument("--data-dir", type=Path, default=shipped_data_dir(), help="the shipped demo corpora")
    parser.add_argument("--out", type=Path, default=Path("runs/domain-pool/pool.jsonl.gz"), help="the pool (JSONL)")
    parser.add_argument("--doc-chars", type=int, default=2000, help="largest document, in characters")
    parser.add_argument("--source-chars", type=int, default=200_000, help="characters kept of each domain's source")
    args = parser.parse_args()
    sources = {"python_manual": python_manual(), "metamath_other": metamath_comments(),
               "debian_copyright": debian_copyright_files(), "austen": austen_novels(args.austen)}
    evaluation = build_index(iter_texts(sorted(args.data_dir.glob("*.validation.jsonl.gz"))
                                        + sorted(args.data_dir.glob("*.heldout.jsonl.gz"))), OVERLAP_CHARS)
    owners = {domain: build_index(iter_texts([args.data_dir / f"{domain}.train.jsonl.gz"]), OVERLAP_CHARS)
              for domain in CLOSED_DOMAINS}
    records = [{"text": text, "source": PUBLIC}
               for text in iter_texts([args.data_dir / "anchor" / "flexolmo_public_sample.jsonl.gz"])]
    summary = {PUBLIC: {"documents": len(records), "characters": sum(len(r["text"]) for r in records)}}
    for name, texts in sources.items():
        candidates = source_documents(texts, args.doc_chars, args.source_chars)
        clean = [text for text, mask in zip(candidates, covered_masks(candidates, evaluation)) if not mask.any()]
        characters = sum(len(text) for text in clean)
        shared = {domain: float(sum(mask.sum() for mask in covered_masks(clean, index)) / max(characters, 1))
                  for domain, index in owners.items()}
        summary[name] = {"documents": len(clean), "characters": characters,
                         "dropped_for_sharing_evaluation_text": len(candidates) - len(clean),
                         "share_of_characters_in_owner_training_text": shared}
        records.extend({"text": text, "source": name} for text in clean)
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, gzip.compress(lines.encode(), mtime=0))
    print(f"pool: {len(records)} documents -> {args.out}")
    write_results(args.out.with_name("pool_sources.json"), summary)


if __name__ == "__main__":
    try:
        main()
    except FlexOlmoError as error:
        raise SystemExit(f"error: {error}") from None
