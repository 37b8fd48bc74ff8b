"""Choosing the package store: the `--store` value `coordinator init` fixed, as one `PackageStore`."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from flexolmo.service.database import get_setting, optional_setting
from flexolmo.service.store import LocalStore, PackageStore

DEFAULT_S3_WORK_DIR = Path("consortium-work")


def open_store(url: str, endpoint: str | None = None) -> PackageStore:
    """`s3://BUCKET/PREFIX` (with `endpoint` for a service other than AWS), else a local directory."""
    if url.startswith("s3://"):
        from flexolmo.service.s3_store import S3Store

        return S3Store(url, endpoint)
    return LocalStore(Path(url))


def store_settings(store: str | Path, work_dir: Path | None, endpoint: str | None) -> dict[str, str]:
    """The settings `init` records: the store's URL (a local one resolved), its endpoint, the work directory
    (a local store's own directory unless given)."""
    url = str(store)
    if not url.startswith("s3://"):
        url = str(Path(url).resolve())
    work = Path(work_dir) if work_dir else (DEFAULT_S3_WORK_DIR if url.startswith("s3://") else Path(url))
    settings = {"store": url, "work_dir": str(work.resolve())}
    if endpoint:
        settings["store_endpoint"] = endpoint
    return settings


def work_dir(session: Session) -> Path:
    """The local work directory (databases made before S3 stores have one directory for both)."""
    return Path(optional_setting(session, "work_dir") or get_setting(session, "store"))


def configured(session: Session) -> tuple[PackageStore, Path]:
    """The consortium's package store and its local work directory."""
    return open_store(get_setting(session, "store"), optional_setting(session, "store_endpoint")), work_dir(session)
