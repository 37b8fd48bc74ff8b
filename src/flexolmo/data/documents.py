"""Documents from data files: the one reader every command that reads text goes through.

Formats:
- `.jsonl` / `.jsonl.gz`: one JSON object per line, text in field `text` (the Dolma convention) unless
  `text_field` says otherwise; an `id` field, when present, names the document.
- `.parquet`: one row per document, text in column `text_field`.
- `.txt`: documents are separated by one or more blank lines (so a paragraph, or any block of lines without an
  empty line inside it, is one document). A file with no blank lines is one document.

Documents that are empty or only whitespace are skipped. Each document is assigned to the held-out split by a
hash of its text alone, so it lands in the same split whatever else is in the file. Tokenisation and its
cache are `data.tokens`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flexolmo.core.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt")
# Split names that end a data file's name before its suffix (`code.heldout.jsonl.gz`), left out of its domain name.
SPLIT_SUFFIXES = (".heldout", ".train", ".test", ".validation", ".valid", ".dev")
DEFAULT_HELDOUT_FRACTION = 0.05
@dataclass(frozen=True)
class Document:
    """One document: an id that names it in reports (never its text) and the text itself."""

    doc_id: str
    text: str


def domain_name(path: Path) -> str:
    """A data file's name without its data suffix and its split suffix: `code.heldout.jsonl.gz` -> `code`."""
    name = path.name[: -len(data_suffix(path))]
    for split in SPLIT_SUFFIXES:
        if name.lower().endswith(split) and len(name) > len(split):
            return name[: -len(split)]
    return name or path.name


def data_suffix(path: Path) -> str:
    """The supported suffix of `path`, or a DataError naming the supported ones."""
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DataError(
        f"{path}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}"
    )


def check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass the data files inside it")


def _decode_line(raw: bytes, path: Path, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}:{line_number}: not valid UTF-8 (byte {error.start}); re-encode the file as UTF-8"
        ) from None


def _check_encodable(text: str, path: Path, line_number: int) -> None:
    """JSON can escape half of a UTF-16 surrogate pair (`\\ud800`), which is no character and has no UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(f"{path}:{line_number}: the text holds a lone surrogate escape "
                        f"({text[error.start]!r} at character {error.start}), which is not a character; fix or "
                        "drop that escape in the file") from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                line = _decode_line(raw, path, line_number).strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    present = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                    raise DataError(
                        f"{path}:{line_number}: no '{text_field}' field (found: {present}); "
                        "pass --text-field NAME"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{line_number}: field '{text_field}' is not a string")
                if not text.isascii():
                    _check_encodable(text, path, line_number)
                doc_id = str(record.get("id", f"{path.name}:{line_number}"))
                yield Document(doc_id, text)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path}: corrupt or truncated gzip file ({error}); re-create it") from None


def _iter_parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    if text_field not in parquet.schema_arrow.names:
        raise DataError(
            f"{path}: no '{text_field}' column (found: {', '.join(parquet.schema_arrow.names)}); "
            "pass --text-field NAME"
        )
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path}: row {row}: column '{text_field}' is not a string")
            yield Document(f"{path.name}:{row}", text or "")


def _iter_txt(path: Path) -> Iterator[Document]:
    block: list[str] = []
    start_line = 1
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode_line(raw, path, line_number)
            if line.strip():
                if not block:
                    start_line = line_number
                block.append(line)
            elif block:
                yield Document(f"{path.name}:{start_line}", "".join(block).rstrip("\n"))
                block = []
    if block:
        yield Document(f"{path.name}:{start_line}", "".join(block).rstrip("\n"))


def iter_documents(path: Path | str, text_field: str = "text") -> Iterator[Document]:
    """Yield the non-empty documents of one data file, in file order."""
    path = Path(path)
    check_readable(path)
    suffix = data_suffix(path)
    if suffix in (".jsonl", ".jsonl.gz"):
        documents = _iter_jsonl(path, text_field)
    elif suffix == ".parquet":
        documents = _iter_parquet(path, text_field)
    else:
        documents = _iter_txt(path)
    for document in documents:
        if document.text.strip():
            yield document


def is_heldout(text: str, heldout_fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a pure function of its text."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < heldout_fraction


def select_split(
    documents: Iterable[Document], split: str, heldout_fraction: float
) -> Iterator[Document]:
    """Keep the documents of `split`: "train", "heldout", or "all" (no split, for files already split)."""
    if split == "all":
        yield from documents
        return
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    want_heldout = split == "heldout"
    for document in documents:
        if is_heldout(document.text, heldout_fraction) == want_heldout:
            yield document


def iter_texts(paths: Sequence[Path | str], text_field: str = "text") -> Iterator[str]:
    """Every document's text across files (used to train a tokenizer)."""
    for path in paths:
        for document in iter_documents(path, text_field):
            yield document.text

