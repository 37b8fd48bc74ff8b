"""Writing outputs so that an interrupted or failed run never leaves something that looks complete.

Every artefact (anchor, checkpoint, expert package, merged model, cache entry) is written under a temporary
sibling name and renamed into place only once it is whole; rename is atomic on one filesystem. Artefacts get
the permissions the user's umask gives any new file (a package is handed to another party, a model is served
by another user), unless a write asks to be private (a key file: owner read/write only).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flexolmo.errors import FlexOlmoError


def _describe_os_error(error: OSError, target: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"disk full while writing {target}: free space on that filesystem and run the command again"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {target}: permission denied; choose a writable output path"
    return f"cannot write {target}: {error.strerror or error}"


def _staging_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")


def _staging_directory(target: Path) -> Path:
    """A new hidden sibling directory of `target`. Not `tempfile.mkdtemp`, which makes it 0700 whatever the
    umask: `mkdir` applies the umask like any directory the user creates."""
    while True:
        staging = _staging_name(target)
        try:
            staging.mkdir()
            return staging
        except FileExistsError:  # a name collision: 48 random bits make a second one vanishingly unlikely
            continue


@contextlib.contextmanager
def atomic_directory(target: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `target` only if the block finishes without error."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FlexOlmoError(f"{target} already exists: choose another output path or remove it first")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = _staging_directory(target)
        file_mode = stat.S_IMODE(staging.stat().st_mode) & 0o666  # mkdir gave it 0777 minus the umask
    except OSError as error:
        raise FlexOlmoError(_describe_os_error(error, target)) from error
    try:
        yield staging
        # safetensors writes its files 0600 whatever the umask (through its own temporary file); give them
        # the mode any other new file gets. Other files were created with open() and already have it.
        for path in staging.rglob("*.safetensors"):
            path.chmod(file_mode)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise FlexOlmoError(_describe_os_error(error, target)) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(target: Path | str, payload: bytes, private: bool = False) -> None:
    """Write `payload` to `target` through a temporary file and a rename. The file gets the umask's permissions,
    or owner read/write only (0600) when `private` (a secret key)."""
    target = Path(target)
    staging, created = _staging_name(target), False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
        created = True
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
    except OSError as error:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(staging)
        raise FlexOlmoError(_describe_os_error(error, target)) from error


def atomic_write_json(target: Path | str, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically."""
    atomic_write_bytes(target, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks so large files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def digest_tensor(digest, name: str, tensor) -> None:
    """Feed one tensor (name, dtype, shape, raw bytes) into a hashlib digest."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes())
