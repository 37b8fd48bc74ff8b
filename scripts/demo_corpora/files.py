"""Reproducible gzip JSONL: rows to bytes with a fixed header, atomic writes, reading back."""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path


def jsonl_gz_bytes(rows: list[dict[str, str]]) -> bytes:
    """Rows as gzip JSONL with a fixed header (no name, mtime 0), so the bytes are reproducible."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return buf.getvalue()


def write_atomic(path: Path, payload: bytes) -> None:
    """The file appears under its name only once complete (written beside it, then renamed)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(payload)
    os.replace(staging, path)


def read_jsonl_gz(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
