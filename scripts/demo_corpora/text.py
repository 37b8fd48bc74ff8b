"""Text helpers every reader shares: cleaning, splitting long text, packing short units, subsampling to
a budget, and the SHA-256 hashes the splits and the row order are defined with."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from .settings import GROUP_TARGET_CHARS, MAX_DOC_CHARS, SourceMissing

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


def hash_bucket(text: str) -> int:
    """The bucket (0..999) every split is defined with."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 1000


def order_key(row: dict[str, str]) -> tuple[int, str]:
    """Rows are interleaved in this fixed pseudo-random order so any prefix of a file is a fair sample."""
    return sha_int(row["text"], "order:"), row["id"]
