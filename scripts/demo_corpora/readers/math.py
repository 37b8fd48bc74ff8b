"""math: the comments of Metamath's set.mm (proofs dropped)."""

from __future__ import annotations

import re

from ..settings import SETMM
from ..text import clean, need, pack, read_text

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
