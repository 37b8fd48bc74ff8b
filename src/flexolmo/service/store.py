"""Packages stored by content: an upload is unpacked into a scratch directory, verified, and only then moved
to `STORE/packages/DIGEST/`; anything refused is removed, so a refusal leaves nothing but its record."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import tempfile
from pathlib import Path

from flexolmo.core.errors import PackageError
from flexolmo.owner.package import PACKAGE_FILES
from flexolmo.service.errors import TooLarge

HEADER_DIGEST = "X-Package-Sha256"
MAX_UPLOAD_BYTES = 4 << 30
# Unpacking needs the upload once more on disk; refuse unless the store keeps this much spare as well.
DISK_MARGIN_BYTES = 64 << 20


def pack_directory(package: Path) -> bytes:
    """A package directory as an uncompressed tar of its files (the upload format); names only, no paths."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(Path(package).iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name, recursive=False)
    return buffer.getvalue()


def check_digest(body: bytes, claimed: str) -> None:
    actual = hashlib.sha256(body).hexdigest()
    if actual != claimed:
        raise PackageError(f"the upload's SHA-256 is {actual[:16]}..., not the {claimed[:16]}... it was sent "
                           "with: it was damaged in transit; submit it again")


def check_room(store: Path, size: int) -> None:
    if size > MAX_UPLOAD_BYTES:
        raise TooLarge(f"the upload is {size} bytes, above the service's limit of {MAX_UPLOAD_BYTES}")
    store.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store).free
    if free < 2 * size + DISK_MARGIN_BYTES:
        raise TooLarge(f"the store {store} has {free} bytes free, too few for a {size}-byte upload; nothing "
                       "was stored")


def unpack(body: bytes, store: Path) -> Path:
    """The uploaded tar unpacked into a new scratch directory under the store (the caller removes it)."""
    store.mkdir(parents=True, exist_ok=True)
    check_room(store, len(body))
    scratch = Path(tempfile.mkdtemp(prefix=".upload-", dir=store))
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
            for member in tar.getmembers():
                if not member.isfile() or member.name not in PACKAGE_FILES:
                    raise PackageError(f"the upload holds {member.name!r}; a package is only the files "
                                       f"{', '.join(PACKAGE_FILES)}")
                source = tar.extractfile(member)
                (scratch / member.name).write_bytes(source.read() if source else b"")
    except (tarfile.TarError, OSError, PackageError) as error:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(error, PackageError):
            raise
        raise PackageError(f"the upload is not a readable tar of a package directory: {error}") from None
    return scratch


def keep(scratch: Path, store: Path, digest: str) -> Path:
    """Move a verified package to its content address (a second copy of the same content is dropped)."""
    target = store / "packages" / digest
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        scratch.rename(target)
    return target
