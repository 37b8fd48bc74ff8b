"""Chunked, resumable uploads: a package too large for one request, or sent over a link that drops, arrives in
chunks appended at a declared offset and is submitted once whole and matching its SHA-256.

An upload is named by its member and the SHA-256 the member declared, so a client that crashed and starts
again finds its own partial upload and resumes from the bytes already received; nothing needs a table. Only
the member that started an upload may add to it or finish it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from flexolmo.core.errors import PackageError
from flexolmo.service.errors import Conflict, Forbidden, NotFound, TooLarge
from flexolmo.service.store import MAX_UPLOAD_BYTES, check_room

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _paths(work: Path, upload: str) -> tuple[Path, Path]:
    directory = work / "uploads"
    return directory / f"{upload}.part", directory / f"{upload}.json"


def _owned(work: Path, member: str, upload: str) -> tuple[Path, dict]:
    if not upload.startswith(f"{member}-"):
        raise Forbidden(f"member '{member}' cannot use upload {upload}: a member acts on its own uploads only")
    part, meta = _paths(work, upload)
    if not meta.is_file():
        raise NotFound(f"no upload {upload}; start it with POST /v1/uploads")
    return part, json.loads(meta.read_text())


def start_upload(work: Path, member: str, sha256: str, size: int, declaration: dict | None = None) -> dict:
    """Start an upload, or find the member's unfinished upload of the same content; returns how much arrived.
    `declaration` (licence, data description) is kept with it for the submission."""
    if not _SHA256.fullmatch(sha256):
        raise PackageError("an upload is declared by the SHA-256 of its tar (64 lower-case hex digits)")
    if not 0 < size <= MAX_UPLOAD_BYTES:
        raise TooLarge(f"an upload of {size} bytes is outside 1..{MAX_UPLOAD_BYTES}")
    upload = f"{member}-{sha256}"
    part, meta = _paths(work, upload)
    part.parent.mkdir(parents=True, exist_ok=True)
    if not meta.is_file():
        check_room(work, size)
        part.write_bytes(b"")
        meta.write_text(json.dumps({"member": member, "sha256": sha256, "size": size,
                                    "declaration": declaration or {}}))
    return {"upload": upload, "received": part.stat().st_size, "size": size}


def put_chunk(work: Path, member: str, upload: str, offset: int, chunk: bytes) -> dict:
    """Append `chunk` at `offset`, which must be exactly the bytes received so far (else 409 says where)."""
    part, meta = _owned(work, member, upload)
    received = part.stat().st_size
    if offset != received:
        raise Conflict(f"upload {upload} has {received} bytes; send the chunk at offset {received}, not {offset}")
    if received + len(chunk) > meta["size"]:
        raise PackageError(f"the chunk would take upload {upload} past its declared {meta['size']} bytes")
    check_room(work, len(chunk))
    with part.open("ab") as handle:
        handle.write(chunk)
    return {"upload": upload, "received": received + len(chunk), "size": meta["size"]}


def take_upload(work: Path, member: str, upload: str) -> tuple[bytes, str, dict]:
    """The whole upload, its declared SHA-256 and the member's declaration, removed from the upload area (the
    caller submits it)."""
    part, meta = _owned(work, member, upload)
    if part.stat().st_size != meta["size"]:
        raise Conflict(f"upload {upload} has {part.stat().st_size} of {meta['size']} bytes; send the rest first")
    body = part.read_bytes()
    part.unlink()
    _paths(work, upload)[1].unlink()
    return body, meta["sha256"], meta.get("declaration", {})
