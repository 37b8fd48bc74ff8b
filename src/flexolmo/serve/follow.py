"""Following the coordinator's signed active set, from a file or from the consortium service over HTTP(S).

`--active-set FILE`: the file is re-verified whenever its inode, modification time or size changes (one `stat`
per request), so a new set written there applies from the next request on.

`--active-set URL` (the consortium service's `GET /v1/active-set`): a thread of its own fetches the URL every
`poll_interval` seconds (bounded: `MIN_POLL`..`MAX_POLL`, so an opt-out reaches the server within one
interval) and re-verifies the envelope whenever its bytes change. The first fetch happens before the server
takes requests. A fetch that fails (service down, timeout, an HTTP error) is not a statement by the
coordinator: the last accepted set stays in force until it expires, and the failure is logged and shown in
`/health` (`fetch_error`). The service renews the set long before it expires, so a server fails closed only
when the service has been unreachable for that long.

Both sources go through the one verifier, `trust.active_set.verify_active_set`: signed by a coordinator key,
well formed, for this model's anchor, not expired, and no older than the version already accepted (a replayed
set would bring back a withdrawn expert). The expiry is checked again on every request. A set that fails any
of these makes the server fail closed: the public expert only, logged once per reason, until a valid set
arrives.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx

from flexolmo.core.errors import TrustError
from flexolmo.model.merged_format import PUBLIC_EXPERT
from flexolmo.trust.active_set import ActiveSet, ActiveSetError, verify_active_set
from flexolmo.trust.signing import TrustedKeys

log = logging.getLogger("flexolmo.serve")

DEFAULT_POLL = 5.0
MIN_POLL, MAX_POLL = 0.1, 300.0
FETCH_TIMEOUT = 10.0
# An active set is a few kilobytes; anything far larger is not one, and is not read into memory whole.
MAX_ENVELOPE_BYTES = 1 << 20


def is_url(source: str | Path) -> bool:
    return str(source).startswith(("http://", "https://"))


@dataclass(frozen=True)
class ActiveState:
    """What the server may use right now by the active set: the mask, its version, why if failing closed, and
    (for a URL) the last fetch's failure while the last accepted set still holds."""

    mask: tuple[bool, ...]
    version: int | None
    failed_closed: str | None = None
    fetch_error: str | None = None
    expires_at: str | None = None

    def as_dict(self) -> dict:
        state = "failed closed: public expert only" if self.failed_closed else "ok"
        return {"state": state, "version": self.version, "reason": self.failed_closed,
                "expires_at": self.expires_at, "fetch_error": self.fetch_error}


class _FetchError(Exception):
    pass


class ActiveSetFollower:
    """Follows a signed active set at `source` (a file path or an http(s) URL); see the module docstring.
    Thread-safe; `current()` is cheap (one `stat` for a file, nothing for a URL)."""

    def __init__(self, source: str | Path, coordinator_keys: Path | str, record: dict,
                 poll_interval: float = DEFAULT_POLL):
        if not MIN_POLL <= poll_interval <= MAX_POLL:
            raise TrustError(f"the active set's poll interval must be between {MIN_POLL} and {MAX_POLL} seconds, "
                             f"got {poll_interval}")
        self.url = str(source) if is_url(source) else None
        self.path = None if self.url else Path(source)
        self.source = self.url or str(self.path)
        self.keys = TrustedKeys(coordinator_keys)
        self.record = record
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._seen: object = None  # the file's (inode, mtime, size), or the URL's last envelope bytes
        self._active: ActiveSet | None = None
        self._accepted_version: int | None = None
        self._refusal: str | None = "no active set read yet"
        self._fetch_error: str | None = None
        self._logged_refusal: str | None = None
        self._logged_version: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http: httpx.Client | None = None

    # --- the sources ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """For a URL: the first fetch, then a thread that polls. (Nothing to start for a file.)"""
        if self.url is None or self._thread is not None:
            return
        log.info("following the active set at %s every %.1f s", self.url, self.poll_interval)
        self._http = httpx.Client(timeout=FETCH_TIMEOUT, headers={"accept": "application/json",
                                                                  "cache-control": "no-cache"})
        self.poll()
        self._thread = threading.Thread(target=self._poll_loop, name="flexolmo-active-set", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=FETCH_TIMEOUT + 5)
        if self._http is not None:
            self._http.close()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.poll()

    def poll(self) -> None:
        """Fetch the URL once; verify the envelope if it changed."""
        try:
            envelope = self._fetch()
        except _FetchError as error:
            with self._lock:
                if self._fetch_error != str(error):
                    log.warning("active set %s: %s; keeping version %s until it expires", self.url, error,
                                self._accepted_version)
                self._fetch_error = str(error)
            return
        with self._lock:
            if self._fetch_error is not None:
                log.info("active set %s is reachable again", self.url)
            self._fetch_error = None
            if envelope != self._seen:
                self._seen = envelope
                self._verify(envelope)

    def _fetch(self) -> bytes:
        try:
            with self._http.stream("GET", self.url) as response:
                if response.status_code != 200:
                    raise _FetchError(f"HTTP {response.status_code} from the service")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ENVELOPE_BYTES:
                        raise _FetchError(f"the answer is over {MAX_ENVELOPE_BYTES} bytes: not an active set")
                return bytes(body)
        except httpx.HTTPError as error:
            raise _FetchError(f"cannot fetch it ({type(error).__name__}: {error})") from None

    def _follow_file(self) -> None:
        try:
            stat = self.path.stat()
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # a new file (atomic write) is a new inode
            if seen == self._seen:
                return
            envelope = self.path.read_bytes()
        except OSError as error:
            self._seen, self._active = None, None
            self._refusal = f"cannot read {self.path} ({error.strerror or error})"
            return
        self._seen = seen
        self._verify(envelope)

    # --- the one verification path --------------------------------------------------------------------------

    def _verify(self, envelope: bytes) -> None:
        self._active = None
        try:
            active = verify_active_set(envelope, self.keys, newer_than=self._accepted_version)
        except ActiveSetError as error:
            self._refusal = str(error)
            return
        if active.anchor_fingerprint != self.record["anchor"]["fingerprint"]:
            self._refusal = f"active set version {active.version} is for another anchor"
            return
        self._active, self._accepted_version, self._refusal = active, active.version, None
        if active.version != self._logged_version:
            self._logged_version = active.version
            log.info("active set version %d accepted from %s: serving %s (expires %s)", active.version,
                     self.source, ", ".join([PUBLIC_EXPERT, *(e.name for e in active.experts)]),
                     active.expires_at.isoformat())

    def current(self) -> ActiveState:
        with self._lock:
            if self.path is not None:
                self._follow_file()
            if self._active is not None:
                try:
                    self._active.check_current()
                except ActiveSetError as error:
                    return self._public_only(str(error))
                self._logged_refusal = None
                return ActiveState(tuple(self._active.expert_mask(self.record["experts"])), self._active.version,
                                   fetch_error=self._fetch_error, expires_at=self._active.expires_at.isoformat())
            return self._public_only(self._refusal or "no active set")

    def _public_only(self, reason: str) -> ActiveState:
        if reason != self._logged_refusal:
            self._logged_refusal = reason
            log.error("active set %s: %s; failing closed: serving the public expert only", self.source, reason)
        mask = tuple(entry["name"] == PUBLIC_EXPERT for entry in self.record["experts"])
        return ActiveState(mask, self._accepted_version, reason, self._fetch_error)
