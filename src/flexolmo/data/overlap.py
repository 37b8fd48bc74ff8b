"""How much held-out text also occurs in training text: the contamination check for an evaluation split.

What is measured, exactly. Text is a sequence of Unicode code points (Python `str` characters, not bytes),
taken as it is: no case folding and no whitespace normalisation, so a re-wrapped copy of a passage is not
detected. A *window* is a run of N consecutive characters inside one document (windows never cross a document
boundary). A held-out character is *shared* when it lies inside at least one held-out window whose exact
string is also a window of some training document. Windows made of one repeated character (the indentation of
deeply nested code, a line of dashes) are left out on both sides: they are no passage. The *share* of a
document (or a file) is its shared characters over all its characters. A document shorter than N characters
has no window, so it is never counted as shared.

How. Every window is reduced to a 64-bit polynomial hash of its code points (arithmetic modulo 2**64, a fixed
odd base), computed for all windows of a batch of documents at once with numpy: a running sum of
`code point * base**position`, differenced over N positions and multiplied by the inverse power of the base.
The training hashes are kept as one sorted array of unique values (8 bytes per distinct window: about 145 MB
for the demo's 20 MB of training text, about twice that while it is built); held-out hashes are looked up in
it with a binary search, and coverage is marked with a difference array over the held-out characters.

A hash collision can only make a held-out window look shared when it is not: the share can be over-counted,
never under-counted. With 64-bit hashes of natural text the expected number of false matches between ~18M
training and ~1M held-out windows is about 1e-6. (Texts built on purpose can make polynomial hashes modulo
2**64 collide; such a file can only inflate its own reported overlap.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from flexolmo.core.errors import DataError
from flexolmo.core.progress import progress_bar
from flexolmo.data.documents import Document, iter_documents

DEFAULT_CHARS = 50
DEFAULT_TOP = 10
# An odd 64-bit constant (odd, so it is invertible modulo 2**64 and windows can be normalised to position 0).
_BASE = 0x9E3779B97F4A7C15
_BASE_INVERSE = pow(_BASE, -1, 2**64)
# Characters hashed per numpy batch: bounds the working memory to a few dozen MB whatever the corpus size.
_BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class WindowIndex:
    """The distinct N-character windows of a training corpus, as sorted unique 64-bit hashes."""

    chars: int
    hashes: np.ndarray
    documents: int
    characters: int

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Which of `hashes` are windows of the training corpus (True may, rarely, be a collision)."""
        found = np.zeros(len(hashes), dtype=bool)
        if len(self.hashes) == 0 or len(hashes) == 0:
            return found
        # Looking up sorted needles walks the index in order: ~10x faster than random probes into 100+ MB.
        order = np.argsort(hashes, kind="stable")
        needles = hashes[order]
        where = np.searchsorted(self.hashes, needles)
        where[where == len(self.hashes)] = 0
        found[order] = self.hashes[where] == needles
        return found


class OverlapSettings(BaseModel):
    """How `measure_overlap` compares text (the flags of `flexolmo data overlap`). Checked where used, with the
    flags' names in the message."""

    chars: int = Field(DEFAULT_CHARS, description="length N of the strings compared, in characters")
    top: int = Field(DEFAULT_TOP, description="worst documents to list per held-out file")


def _check_chars(chars: int) -> None:
    if not isinstance(chars, int) or chars < 1:
        raise DataError(f"window length must be a positive number of characters, got {chars!r}; use e.g. 50")


def _code_points(texts: Sequence[str]) -> np.ndarray:
    # surrogatepass: a lone surrogate (legal in a Python str read from JSON) is one character like any other.
    return np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _powers(base: int, count: int) -> np.ndarray:
    """base**0 .. base**(count-1) modulo 2**64 (uint64 arithmetic wraps, which is the modulus we want)."""
    powers = np.full(count, base, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)


def _batch_windows(texts: Sequence[str], chars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hashes of every window of a batch of documents, the window start offsets in the concatenated batch, and
    each document's start offset (plus the total length at the end)."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    total = int(bounds[-1])
    if total < chars:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), bounds
    points = _code_points(texts).astype(np.uint64)
    with np.errstate(over="ignore"):
        running = np.concatenate([[np.uint64(0)], np.cumsum(points * _powers(_BASE, total), dtype=np.uint64)])
        count = total - chars + 1
        hashes = (running[chars:] - running[:count]) * _powers(_BASE_INVERSE, count)
    # A window is kept only when its first and last characters belong to the same document ...
    document_of = np.repeat(np.arange(len(texts)), lengths)
    keep = document_of[:count] == document_of[chars - 1:]
    if chars > 1:
        # ... and holds more than one distinct character: a run of spaces or dashes is no passage.
        same = np.concatenate([[0], np.cumsum(points[1:] == points[:-1])])
        keep &= (same[chars - 1:] - same[:count]) < chars - 1
    starts = np.flatnonzero(keep)
    return hashes[starts], starts, bounds


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values, sorting `values` in place (np.unique copies, and numpy >= 2.3 hashes first,
    which is tens of times slower on millions of 64-bit values)."""
    values.sort()
    keep = np.ones(len(values), dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def build_index(texts: Iterable[str], chars: int = DEFAULT_CHARS) -> WindowIndex:
    """Index every N-character window of the training texts (each text is one document)."""
    _check_chars(chars)
    parts: list[np.ndarray] = []
    documents = characters = 0
    for batch in _batches(texts):
        hashes, _, _ = _batch_windows(batch, chars)
        parts.append(_sorted_unique(hashes))  # distinct per batch first: repeated boilerplate shrinks early
        documents += len(batch)
        characters += sum(len(t) for t in batch)
    merged = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    parts.clear()  # the batches' arrays are freed before the final sort: peak memory ~2x the index
    hashes = _sorted_unique(merged)
    return WindowIndex(chars=chars, hashes=hashes, documents=documents, characters=characters)


def covered_masks(texts: Sequence[str], index: WindowIndex) -> list[np.ndarray]:
    """For each text, a boolean array over its characters: True where a window found in the index covers it."""
    masks: list[np.ndarray] = []
    for batch in _batches(texts):
        hashes, starts, bounds = _batch_windows(batch, index.chars)
        hits = starts[index.contains(hashes)]
        # Difference array: +1 where a shared window starts, -1 just after it ends; covered where the sum > 0.
        delta = np.zeros(int(bounds[-1]) + 1, dtype=np.int32)
        delta[hits] += 1  # window starts are distinct, so plain fancy indexing adds once per window
        delta[hits + index.chars] -= 1
        covered = np.cumsum(delta[:-1]) > 0
        masks.extend(covered[bounds[i]:bounds[i + 1]] for i in range(len(batch)))
    return masks


@dataclass(frozen=True)
class DocumentOverlap:
    """One held-out document, named by its id (never its text)."""

    doc_id: str
    characters: int
    shared: int

    @property
    def share(self) -> float:
        return self.shared / self.characters if self.characters else 0.0


@dataclass(frozen=True)
class FileOverlap:
    """One held-out file: totals, the documents over half covered, and the worst documents."""

    path: str
    documents: int
    characters: int
    shared: int
    documents_over_half: int
    worst: list[DocumentOverlap] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.shared / self.characters if self.characters else 0.0


@dataclass(frozen=True)
class OverlapReport:
    """Shared share of every held-out file against one set of training files."""

    chars: int
    train_files: list[str]
    train_documents: int
    train_characters: int
    train_windows: int
    files: list[FileOverlap]

    def as_dict(self) -> dict:
        return {
            "chars": self.chars,
            "measure": "share of held-out characters inside an N-character string that also occurs in a "
                       "training document (exact code points, windows within one document)",
            "train": {"files": self.train_files, "documents": self.train_documents,
                      "characters": self.train_characters, "distinct_windows": self.train_windows},
            "heldout": [
                {"path": f.path, "documents": f.documents, "characters": f.characters, "shared": f.shared,
                 "share": f.share, "documents_over_half": f.documents_over_half,
                 "worst": [{"id": d.doc_id, "characters": d.characters, "shared": d.shared, "share": d.share}
                           for d in f.worst]}
                for f in self.files
            ],
        }


def _read_texts(path: Path, text_field: str) -> list[Document]:
    documents = list(iter_documents(path, text_field))
    if not documents:
        raise DataError(f"{path}: no documents with text; check the file or --text-field")
    return documents


def file_overlap(path: Path | str, index: WindowIndex, top: int = DEFAULT_TOP,
                 text_field: str = "text") -> FileOverlap:
    """Shared share of one held-out file against an index, with its `top` most covered documents."""
    documents = _read_texts(Path(path), text_field)
    masks = covered_masks([d.text for d in documents], index)
    per_document = [DocumentOverlap(d.doc_id, len(d.text), int(m.sum())) for d, m in zip(documents, masks)]
    worst = sorted((d for d in per_document if d.shared), key=lambda d: (-d.share, -d.shared, d.doc_id))
    return FileOverlap(
        path=str(path),
        documents=len(per_document),
        characters=sum(d.characters for d in per_document),
        shared=sum(d.shared for d in per_document),
        documents_over_half=sum(d.share > 0.5 for d in per_document),
        worst=worst[:top],
    )


def measure_overlap(
    train_files: Sequence[Path | str],
    heldout_files: Sequence[Path | str],
    chars: int = DEFAULT_CHARS,
    top: int = DEFAULT_TOP,
    text_field: str = "text",
) -> OverlapReport:
    """Share of each held-out file's characters covered by N-character strings found in the training files."""
    _check_chars(chars)
    if top < 0:
        raise DataError(f"--top must be >= 0, got {top}")
    if not train_files or not heldout_files:
        raise DataError("give at least one training file and one held-out file")
    for path in [*train_files, *heldout_files]:
        next(iter_documents(path, text_field), None)  # a missing or unreadable file fails before any work

    def train_texts() -> Iterator[str]:
        with progress_bar("indexing training text", total=len(train_files), unit="files") as advance:
            for path in train_files:
                for document in iter_documents(path, text_field):
                    yield document.text
                advance()

    index = build_index(train_texts(), chars)
    if index.characters == 0:
        raise DataError("the training files hold no text; check the paths or --text-field")
    files = [file_overlap(path, index, top, text_field) for path in heldout_files]
    return OverlapReport(chars=chars, train_files=[str(p) for p in train_files],
                         train_documents=index.documents, train_characters=index.characters,
                         train_windows=len(index.hashes), files=files)
