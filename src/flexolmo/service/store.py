"""Where packages live. An upload is unpacked into local scratch space, its package is put into the store's
`incoming/` area until a worker has admitted it, and only an admitted package is kept, under its content
digest: `packages/DIGEST/`. A refused one is deleted, so a refusal leaves nothing but its record.

One interface, two stores, chosen by the `--store` URL that `coordinator init` fixes (`storage.open_store`):
a local directory (`LocalStore`, the default) or an S3-compatible bucket, `s3://BUCKET/PREFIX` with an
optional endpoint URL (`s3_store.S3Store`; credentials from boto3's usual environment, never the database). Everything
that must be a local file (partial uploads, scratch space, the package cache of a publisher, published versions)
is under the local work directory: the store's own directory for a local store.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from flexolmo.core.errors import PackageError
from flexolmo.owner.package import MANIFEST_FILE, PACKAGE_FILES, TENSOR_FILE, package_digest
from flexolmo.service.errors import StoreUnavailable, TooLarge

HEADER_DIGEST = "X-Package-Sha256"
MAX_UPLOAD_BYTES = 4 << 30
# Unpacking needs the upload once more on disk; refuse unless the store keeps this much spare as well.
DISK_MARGIN_BYTES = 64 << 20


class PackageStore(ABC):
    """Package directories by name (`incoming/ID`, `packages/DIGEST`): put, fetch, copy, delete, list."""

    url: str

    @abstractmethod
    def put(self, name: str, directory: Path) -> None:
        """Store the files of `directory` as `name` (replacing what was there)."""

    @abstractmethod
    def fetch(self, name: str, scratch: Path) -> Path:
        """A local directory holding `name`'s files: the stored one itself, or a copy under `scratch`."""

    @abstractmethod
    def copy(self, source: str, target: str) -> None:
        """Store `source`'s files again as `target` (within the store, without a round trip through here)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove `name`; nothing happens when it is absent."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def names(self, area: str) -> list[str]:
        """The entries of `area` (e.g. `incoming`), as names under it."""

    def location(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"


class LocalStore(PackageStore):
    """A directory on this machine; the default."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def put(self, name: str, directory: Path) -> None:
        target = self.root / name
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(directory, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)

    def fetch(self, name: str, scratch: Path) -> Path:
        if not (self.root / name).is_dir():
            raise StoreUnavailable(f"the store {self.root} holds no {name}")
        return self.root / name

    def copy(self, source: str, target: str) -> None:
        if not (self.root / target).exists():
            # Hard links: the same bytes once on disk, however many names (a package can be large).
            staging = (self.root / target).with_name(f".{Path(target).name}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.root / source, staging, copy_function=os.link)
            staging.rename(self.root / target)

    def delete(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_dir()

    def names(self, area: str) -> list[str]:
        directory = self.root / area
        return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) if directory.is_dir() else []


def incoming_name(token: str) -> str:
    return f"incoming/{token}"


def package_name(digest: str) -> str:
    return f"packages/{digest}"


def checked_digest(directory: Path, expected: str, what: str) -> Path:
    """`directory` once its package digest is `expected` (content addressing: a changed object is refused)."""
    actual = package_digest(directory)
    if actual != expected:
        raise StoreUnavailable(f"{what} in the store has digest {actual[:16]}..., not {expected[:16]}...: it was "
                               "changed after it was stored")
    return directory


def fetch_package(store: PackageStore, digest: str, cache: Path) -> Path:
    """A verified local copy of the admitted package `digest` (kept in `cache` for the next publication)."""
    if isinstance(store, LocalStore):
        return checked_digest(store.fetch(package_name(digest), cache), digest, f"package {digest[:16]}")
    target = cache / digest
    if target.is_dir() and package_digest(target) == digest:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        fetched = checked_digest(store.fetch(package_name(digest), scratch), digest, f"package {digest[:16]}")
        shutil.rmtree(target, ignore_errors=True)
        fetched.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


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


def check_room(work: Path, size: int) -> None:
    if size > MAX_UPLOAD_BYTES:
        raise TooLarge(f"the upload is {size} bytes, above the service's limit of {MAX_UPLOAD_BYTES}")
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 2 * size + DISK_MARGIN_BYTES:
        raise TooLarge(f"the store {work} has {free} bytes free, too few for a {size}-byte upload; nothing "
                       "was stored")


def unpack(body: bytes, work: Path) -> Path:
    """The uploaded tar unpacked into a new scratch directory under `work` (the caller removes it); it must
    hold a manifest and a tensor file, so that its digest names it."""
    work.mkdir(parents=True, exist_ok=True)
    check_room(work, len(body))
    scratch = Path(tempfile.mkdtemp(prefix=".upload-", dir=work))
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
            for member in tar.getmembers():
                if not member.isfile() or member.name not in PACKAGE_FILES:
                    raise PackageError(f"the upload holds {member.name!r}; a package is only the files "
                                       f"{', '.join(PACKAGE_FILES)}")
                source = tar.extractfile(member)
                (scratch / member.name).write_bytes(source.read() if source else b"")
        missing = [name for name in (MANIFEST_FILE, TENSOR_FILE) if not (scratch / name).is_file()]
        if missing:
            raise PackageError(f"the upload lacks {', '.join(missing)}; a package is the files "
                               f"{', '.join(PACKAGE_FILES)}")
    except (tarfile.TarError, OSError, PackageError) as error:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(error, PackageError):
            raise
        raise PackageError(f"the upload is not a readable tar of a package directory: {error}") from None
    return scratch
