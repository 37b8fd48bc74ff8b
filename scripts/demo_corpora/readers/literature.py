"""literature: Sherlock Holmes and War and Peace (Norvig's big.txt), King James Bible."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ..locate import find_package_dir
from ..settings import INSTALL_HINT, SourceMissing
from ..text import clean, need, pack, read_text

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
