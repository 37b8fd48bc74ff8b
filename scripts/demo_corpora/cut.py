"""Cutting shared passages out of text: which characters go (whole short lines, or runs widened to whole
words), and cutting a set of rows until nothing in it is covered by an index."""

from __future__ import annotations

from .settings import MIN_DOC_CHARS, WHOLE_LINE_MAX, WHOLE_LINE_MIN_COVERED
from .text import clean


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
