"""Writing outputs so that an interrupted or failed run never leaves something that looks complete.

Every artefact (anchor, checkpoint, expert package, merged model, cache entry) is written under a temporary
sibling name and renamed into place only once it is whole; rename is atomic on one filesystem. A staging
directory is never read as an artefact by anyone but the run writing it (`check_not_staging`), and the next run
that writes into the same folder removes those of killed runs. An output is never written inside one of the
command's inputs (`check_outside_inputs`), and a result file is never overwritten without `force`
(`check_new_file`). Artefacts get
the permissions the user's umask gives any new file (a package is handed to another party, a model is served
by another user), unless a write asks to be private (a key file: owner read/write only).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from flexolmo.core.errors import FlexOlmoError


def _describe_os_error(error: OSError, target: Path) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {target}: free space on that filesystem and run the command again"
    if error.errno == errno.EROFS:
        return f"cannot write {target}: the filesystem is read-only; choose a writable output path"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {target}: permission denied; choose a writable output path"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"cannot write {target}: a part of that path is a file, not a directory; choose another output path"
    return f"cannot write {target}: {error.strerror or error}"


# How safetensors words the same causes (it reports a failed write as its own error, not as an OSError).
_SAFETENSORS_FULL = ("No space left", "os error 28", "os error 122")
_SAFETENSORS_READ_ONLY = ("Read-only file system", "os error 30")
_SAFETENSORS_DENIED = ("Permission denied", "os error 13", "os error 1)")


def _describe_safetensors_error(error: Exception, target: Path) -> str:
    text = str(error)
    if any(marker in text for marker in _SAFETENSORS_FULL):
        return f"disk full while writing {target}: free space on that filesystem and run the command again"
    if any(marker in text for marker in _SAFETENSORS_READ_ONLY):
        return f"cannot write {target}: the filesystem is read-only; choose a writable output path"
    if any(marker in text for marker in _SAFETENSORS_DENIED):
        return f"cannot write {target}: permission denied; choose a writable output path"
    return f"cannot write {target}: {text.splitlines()[0] if text else type(error).__name__}"


# The errors of a full or unwritable filesystem: the user's to fix, not a bug, so one line says what and where.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def storage_problem(error: BaseException) -> str | None:
    """One line for a write that failed because the filesystem is full, read-only or not ours; None for any
    other error. Understands OSError (with its file name) and safetensors' own error for the same causes."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return _describe_os_error(error, Path(error.filename or "a file"))
    text = str(error)
    if isinstance(error, SafetensorError) and any(
            marker in text for marker in _SAFETENSORS_FULL + _SAFETENSORS_READ_ONLY + _SAFETENSORS_DENIED):
        return _describe_safetensors_error(error, Path("a safetensors file"))
    return None


def save_torch(obj: Any, path: Path) -> None:
    """`torch.save` through a Python file, so a full disk surfaces as the OSError it is: torch's own writer
    reports it as an opaque RuntimeError ("unexpected pos ..."), with the OSError only as its context."""
    import torch

    try:
        with open(path, "wb") as handle:
            torch.save(obj, handle)
    except RuntimeError as error:
        if isinstance(error.__context__, OSError):
            cause = error.__context__
            raise OSError(cause.errno, cause.strerror, str(path)) from None
        raise


# A staging directory older than this without a lock file was left by a run killed before it could lock it.
_UNLOCKED_STAGING_GRACE_SECONDS = 600.0
_STAGING_LOCK = ".lock"


# `.NAME.tmp-XXXX`: the hidden parent of a staging directory (and the name of a file being written atomically).
_STAGING_NAME = re.compile(r"\.(.+)\.tmp-[A-Za-z0-9_]+")
# The staging directories this process is writing now: only their writer may read them (admission, signing).
_held_staging: set[Path] = set()


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def check_not_staging(path: Path | str) -> None:
    """Refuse `path` when it lies in another run's staging directory: a run killed, failed or still writing,
    whose output was never checked, logged or signed, is never loaded as an artefact."""
    resolved = Path(path).resolve()
    for outer in (resolved, *resolved.parents):
        if _STAGING_NAME.fullmatch(outer.name) and outer.is_dir() and outer not in _held_staging:
            raise FlexOlmoError(f"{path}: inside {outer.name}, the staging directory of a run that did not finish "
                                "(killed, failed or still writing), so never checked, logged or signed; use the "
                                "finished output, or rerun the command (the next run writing there removes it)")


def check_new_file(path: Path | str, force: bool, flag: str = "--json") -> Path:
    """Before any work: `path` may be written as a result file (it does not exist, or `force` allows replacing
    a file); returns it as a Path."""
    path = Path(path)
    if path.is_dir():
        raise FlexOlmoError(f"{flag} {path}: is a directory; give a file path")
    if path.exists() and not force:
        raise FlexOlmoError(f"{flag} {path}: already exists; choose another path or pass --force to replace it")
    return path


def check_outside_inputs(out: Path | str, inputs: Iterable[tuple[str, Path | str | None]],
                         flag: str = "--out") -> None:
    """Before any work: the output `out` is not one of the inputs ((role, path) pairs: package, model, anchor)
    nor inside one, so writing it can never change an input."""
    target = Path(out).resolve()
    for role, source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if target == source or source in target.parents:
            raise FlexOlmoError(f"{flag} {out} lies inside the {role} {source}: writing it would change an input; "
                                "choose an output path outside every input")


def _is_stale_staging(outer: Path) -> bool:
    """Whether a staging directory's run is gone: its lock can be taken, or it never locked and is old."""
    lock = outer / _STAGING_LOCK
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - outer.stat().st_mtime > _UNLOCKED_STAGING_GRACE_SECONDS
        except FileNotFoundError:
            return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live run holds it
    finally:
        os.close(fd)
    return True


def _is_ours(outer: Path) -> bool:
    """Whether `outer` has the shape `atomic_directory` gives a staging directory, `.NAME.tmp-XXXX/` holding
    nothing but its lock and `NAME/`: another program's directory of a similar name is never removed."""
    match = _STAGING_NAME.fullmatch(outer.name)
    try:
        return bool(match) and outer.is_dir() and {child.name for child in outer.iterdir()} <= {
            _STAGING_LOCK, match.group(1)}
    except OSError:
        return False


def remove_stale_staging(target: Path | str) -> list[Path]:
    """Remove the hidden staging directories that killed runs left beside `target`, for any output of that
    folder (not only `target`'s); returns what was removed.

    Each run holds an exclusive lock on its staging directory while it writes, and the kernel drops the lock
    when the process dies, so a directory whose lock can be taken belongs to no live run."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for outer in sorted(target.parent.glob(".*.tmp-*")):
        if _is_ours(outer) and _is_stale_staging(outer):
            shutil.rmtree(outer, ignore_errors=True)
            removed.append(outer)
    return removed


def _staging_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if absent) for the block, so that processes sharing a
    cache (the ranks of one run) take turns filling an entry instead of replacing it under each other's reads."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise FlexOlmoError(_describe_os_error(error, path)) from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `target` only if the block finishes without error.

    The temporary directory is `.NAME.tmp-XXXX/NAME` beside the target: it already has the target's name (a
    signature records the directory's name), and the hidden parent holds a lock for as long as this run lives,
    so that a later run can tell the leftovers of a killed run from a run in progress and remove them.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FlexOlmoError(f"{target} already exists: choose another output path or remove it first")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        outer = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
    except OSError as error:
        raise FlexOlmoError(_describe_os_error(error, target)) from error
    lock = os.open(outer / _STAGING_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    _held_staging.add(outer.resolve())
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        staging = outer / target.name
        staging.mkdir()  # not mkdtemp's 0700: mkdir applies the umask like any directory the user creates
        file_mode = stat.S_IMODE(staging.stat().st_mode) & 0o666
        yield staging
        # safetensors writes its files 0600 whatever the umask (through its own temporary file); give them
        # the mode any other new file gets. Other files were created with open() and already have it.
        for path in staging.rglob("*.safetensors"):
            path.chmod(file_mode)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as error:
        raise FlexOlmoError(_describe_os_error(error, target)) from error
    except SafetensorError as error:
        if "serializing" not in str(error):
            raise  # a damaged input read inside the block, not a failed write
        raise FlexOlmoError(_describe_safetensors_error(error, target)) from error
    finally:
        os.close(lock)
        shutil.rmtree(outer, ignore_errors=True)
        _held_staging.discard(outer.resolve())


def make_directory(path: Path | str) -> None:
    """`mkdir -p`, with a failure (read-only, not a directory, disk full) as one readable line."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FlexOlmoError(_describe_os_error(error, Path(path))) from error


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
