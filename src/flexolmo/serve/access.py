"""Who may use which expert: API keys (`--keys`), the request's own narrowing, and the signed active set.

A request's mask is the intersection of three things, and the public expert is in all of them:
- what its API key may use (`--keys FILE`: a JSON object from each key to a list of expert names, `["*"]` for
  all; without `--keys`, every caller may use every expert, which suits a server on loopback only);
- the request's `experts` field, which narrows and never widens (an expert the key may not use is a 403);
- the coordinator's signed active set (`--active-set FILE --coordinator-keys DIR`), re-read whenever the file
  changes and checked for expiry on every request. An expert leaving it is masked from the next request on.
  A set that cannot be used (bad signature, expired, replayed, for another anchor, unreadable) makes the
  server fail closed: it serves the public expert only until a valid set appears, logs why, and says so in
  `/health`.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from flexolmo.core.errors import FlexOlmoError, TrustError
from flexolmo.model.merged_format import PUBLIC_EXPERT
from flexolmo.trust.active_set import ActiveSetError, read_active_set
from flexolmo.trust.signing import TrustedKeys

log = logging.getLogger("flexolmo.serve")
ALL_EXPERTS = "*"


class AccessError(FlexOlmoError):
    """A request that may not run as asked; `status` is its HTTP status (400, 401 or 403)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_keys(path: Path | str, expert_names: list[str]) -> dict[str, frozenset[str]]:
    """The `--keys` file as key -> the experts it may use (public always included), checked against the model."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TrustError(f"{path}: cannot read the API keys (a JSON object from key to expert names): {error}") \
            from None
    if not isinstance(raw, dict) or not all(isinstance(names, list) for names in raw.values()):
        raise TrustError(f"{path}: must be a JSON object from each API key to a list of expert names")
    keys = {}
    for key, names in raw.items():
        unknown = sorted(set(names) - set(expert_names) - {ALL_EXPERTS})
        if unknown:
            raise TrustError(f"{path}: key {key[:4]}... names expert(s) {', '.join(unknown)} that the model does "
                             f"not have (it has: {', '.join(expert_names)})")
        keys[key] = frozenset(expert_names if ALL_EXPERTS in names else [*names, PUBLIC_EXPERT])
    return keys


def allowed_experts(keys: dict[str, frozenset[str]] | None, api_key: str | None,
                    expert_names: list[str]) -> frozenset[str]:
    """The experts an API key may use; 401 for a missing or unknown key when keys are configured."""
    if keys is None:
        return frozenset(expert_names)
    if not api_key:
        raise AccessError(401, "an API key is required (Authorization: Bearer KEY)")
    if api_key not in keys:
        raise AccessError(401, "unknown API key")
    return keys[api_key]


def requested_experts(allowed: frozenset[str], requested: list[str] | None, expert_names: list[str]) -> set[str]:
    """The request's `experts` narrowing what its key allows: 400 for a name the model lacks, 403 for one the
    key may not use. The public expert is always in."""
    if requested is None:
        return set(allowed)
    unknown = sorted(set(requested) - set(expert_names))
    if unknown:
        raise AccessError(400, f"the model has no expert(s) {', '.join(unknown)} (it has: {', '.join(expert_names)})")
    forbidden = sorted(set(requested) - allowed)
    if forbidden:
        raise AccessError(403, f"this API key may not use expert(s) {', '.join(forbidden)}")
    return {*requested, PUBLIC_EXPERT}


@dataclass(frozen=True)
class ActiveState:
    """What the server may use right now by the active set: the mask, its version, and why if failing closed."""

    mask: tuple[bool, ...]
    version: int | None
    failed_closed: str | None = None

    def as_dict(self) -> dict:
        state = "failed closed: public expert only" if self.failed_closed else "ok"
        return {"state": state, "version": self.version, "reason": self.failed_closed}


class ActiveSetFollower:
    """Follows a signed active-set file: re-verified when its modification time or size changes, and checked
    for expiry on every call. Thread-safe; `current()` is cheap when nothing changed (one stat)."""

    def __init__(self, path: Path | str, coordinator_keys: Path | str, record: dict):
        self.path = Path(path)
        self.keys = TrustedKeys(coordinator_keys)
        self.record = record
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._active = None
        self._accepted_version: int | None = None
        self._state: ActiveState | None = None

    def _public_only(self, reason: str) -> ActiveState:
        mask = tuple(entry["name"] == PUBLIC_EXPERT for entry in self.record["experts"])
        state = ActiveState(mask, self._accepted_version, reason)
        if self._state is None or self._state.failed_closed != reason:
            log.error("active set %s: %s; failing closed: serving the public expert only", self.path, reason)
        return state

    def _reload(self) -> None:
        self._active = None
        try:
            active = read_active_set(self.path, self.keys, newer_than=self._accepted_version)
        except ActiveSetError as error:
            self._state = self._public_only(str(error))
            return
        if active.anchor_fingerprint != self.record["anchor"]["fingerprint"]:
            self._state = self._public_only(f"active set version {active.version} is for another anchor")
            return
        self._active, self._accepted_version = active, active.version
        log.info("active set version %d accepted: %s", active.version,
                 ", ".join(expert.name for expert in active.experts) or "public only")

    def current(self) -> ActiveState:
        with self._lock:
            try:
                stat = self.path.stat()
                seen = (stat.st_mtime_ns, stat.st_size)
            except OSError as error:
                seen, self._seen, self._active = None, None, None
                self._state = self._public_only(f"cannot read {self.path} ({error.strerror})")
            if seen is not None and seen != self._seen:
                self._seen = seen
                self._reload()
            if self._active is not None:
                try:
                    self._active.check_current()
                    self._state = ActiveState(tuple(self._active.expert_mask(self.record["experts"])),
                                              self._active.version)
                except ActiveSetError as error:
                    self._state = self._public_only(str(error))
            return self._state
