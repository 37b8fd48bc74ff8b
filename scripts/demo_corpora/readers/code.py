"""code: the CPython standard library, cut into chunks at function and class boundaries."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from ..settings import MAX_DOC_CHARS, SourceMissing
from ..text import clean, read_text

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
