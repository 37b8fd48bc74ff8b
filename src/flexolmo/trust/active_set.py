"""The active set: which owners' experts a consortium's models may use right now, signed by the coordinator.

This is the one contract between the consortium service, which issues a new active set on every admission and
withdrawal, and every server of a merged model, which masks each expert that is not in it from its next
request on. An opt-out takes effect by publishing an active set without the expert; no checkpoint changes.

What it says (`ActiveSet`): a version that only grows, the anchor it is about, when it was issued and when it
expires, and each active expert by name *and* package digest (`package_sha256`, the digest the merged model's
record holds for that expert). An expert of a merged model is active only if both match, so a re-submitted
package under the same name is not silently treated as the one that was withdrawn or admitted. The anchor's
own (`public`) expert is never listed: it is always active.

How it travels: a DSSE envelope (the signing envelope of in-toto and Sigstore, through `securesystemslib`)
whose payload is the active set's JSON, signed with the coordinator's elliptic-curve key (the keys `flexolmo
keygen` makes). Its key id is the SHA-256 of the PEM public key, as in the signatures of packages and merged
models, so one trusted-keys directory names its signer.

How a reader must treat it (`verify_active_set`): refuse a signature by any key but the coordinator's, a
malformed payload, an expired set, and a version older than one it has already accepted (a replayed set
would bring back a withdrawn expert). A server that cannot get a valid, current active set fails closed: it
serves the public expert only and says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from flexolmo.core.errors import TrustError
from flexolmo.core.fileio import atomic_write_bytes
from flexolmo.trust.signing import TrustedKeys, key_id, load_private_key, load_public_key

PAYLOAD_TYPE = "application/vnd.flexolmo.active-set+json"
ACTIVE_SET_FORMAT = "flexolmo-active-set"
ACTIVE_SET_FORMAT_VERSION = 1
# The anchor's own expert: always active, never listed.
ALWAYS_ACTIVE = "public"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ActiveSetError(TrustError):
    """An active set that cannot be used: malformed, wrongly signed, replayed or expired."""


class ActiveSetExpired(ActiveSetError):
    """A well-signed active set whose time is up: the coordinator has not renewed it."""


class ActiveExpert(BaseModel):
    """One owner's expert, by name and by the digest of the package it was merged from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    package_sha256: str

    @field_validator("package_sha256")
    @classmethod
    def _is_sha256(cls, value: str) -> str:
        if not _HEX64.fullmatch(value):
            raise ValueError("package_sha256 must be 64 lower-case hex digits")
        return value


class ActiveSet(BaseModel):
    """Which experts may be used, from when to when; see the module docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["flexolmo-active-set"] = ACTIVE_SET_FORMAT
    format_version: Literal[1] = ACTIVE_SET_FORMAT_VERSION
    version: int = Field(ge=1)
    anchor_fingerprint: str = Field(min_length=1)
    issued_at: datetime
    expires_at: datetime
    experts: tuple[ActiveExpert, ...] = ()
    # Experts withdrawn so far, kept so that a reader can say *why* an expert is off, not only that it is.
    withdrawn: tuple[ActiveExpert, ...] = ()

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("times must carry a time zone (UTC)")
        return value.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _consistent(self) -> ActiveSet:
        names = [expert.name for expert in self.experts]
        if len(set(names)) != len(names):
            raise ValueError("an expert is listed twice")
        if ALWAYS_ACTIVE in names:
            raise ValueError(f"'{ALWAYS_ACTIVE}' is the anchor's expert and is never listed")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must come after issued_at")
        return self

    def is_active(self, name: str, package_sha256: str | None) -> bool:
        """Whether the expert of this name, merged from this package, may be used."""
        if name == ALWAYS_ACTIVE:
            return True
        return ActiveExpert.model_construct(name=name, package_sha256=package_sha256 or "") in set(self.experts)

    def expert_mask(self, record_experts: Sequence[dict]) -> list[bool]:
        """For the experts of a merged model's record (`flexolmo_experts.json`, slot order): which are active."""
        return [self.is_active(entry.get("name", ""), entry.get("package_sha256")) for entry in record_experts]

    def check_current(self, now: datetime | None = None) -> None:
        now = now or datetime.now(timezone.utc)
        if now >= self.expires_at:
            raise ActiveSetExpired(f"active set version {self.version} expired at {self.expires_at.isoformat()}; "
                                   "the coordinator must issue a new one")

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def new_active_set(version: int, anchor_fingerprint: str, experts: Sequence[ActiveExpert],
                   lifetime: timedelta, withdrawn: Sequence[ActiveExpert] = (),
                   now: datetime | None = None) -> ActiveSet:
    """An active set issued now and valid for `lifetime`."""
    now = now or datetime.now(timezone.utc)
    try:
        return ActiveSet(version=version, anchor_fingerprint=anchor_fingerprint, issued_at=now,
                         expires_at=now + lifetime, experts=tuple(experts), withdrawn=tuple(withdrawn))
    except ValidationError as error:
        raise ActiveSetError(f"invalid active set: {_first_error(error)}") from None


def _sslib_key(public_key) -> SSlibKey:
    return SSlibKey.from_crypto(public_key, keyid=key_id(public_key))


def sign_active_set(active: ActiveSet, key_path: Path | str) -> bytes:
    """The active set as a DSSE envelope (JSON bytes) signed with the coordinator's private key."""
    private_key = load_private_key(Path(key_path))
    signer = CryptoSigner(private_key, _sslib_key(private_key.public_key()))
    envelope = Envelope(payload=active.to_json(), payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(signer)
    return json.dumps(envelope.to_dict(), sort_keys=True).encode()


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def _read_envelope(envelope: bytes) -> Envelope:
    try:
        parsed = Envelope.from_dict(json.loads(envelope))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ActiveSetError(f"not a signed active set (a DSSE envelope of JSON): {error}") from None
    if parsed.payload_type != PAYLOAD_TYPE:
        raise ActiveSetError(f"the envelope holds '{parsed.payload_type}', not an active set ({PAYLOAD_TYPE})")
    return parsed


def verify_active_set(envelope: bytes, coordinator_keys: TrustedKeys, now: datetime | None = None,
                      newer_than: int | None = None) -> ActiveSet:
    """The active set in `envelope`, once it is signed by one of `coordinator_keys`, well formed, current and
    (with `newer_than`, the version last accepted) no older than what the reader already holds.

    `coordinator_keys` must hold the coordinator's public key(s) only, never the members': a member must not be
    able to issue an active set."""
    parsed = _read_envelope(envelope)
    keys = [_sslib_key(load_public_key(path)) for path in coordinator_keys.paths.values()]
    try:
        parsed.verify(keys, 1)
    except VerificationError:
        signers = ", ".join(signature.keyid[:16] + "..." for signature in parsed.signatures.values()) or "nobody"
        raise ActiveSetError(f"the active set is not signed by a coordinator key in {coordinator_keys.directory} "
                             f"(signed by key id {signers}); refuse it") from None
    try:
        active = ActiveSet.model_validate_json(parsed.payload)
    except ValidationError as error:
        raise ActiveSetError(f"the signed active set is malformed: {_first_error(error)}") from None
    if newer_than is not None and active.version < newer_than:
        raise ActiveSetError(f"active set version {active.version} is older than version {newer_than} already "
                             "accepted; a replayed active set is refused")
    active.check_current(now)
    return active


def write_active_set(path: Path | str, envelope: bytes) -> Path:
    """Write a signed active set atomically, so a reader never sees half of one."""
    path = Path(path)
    atomic_write_bytes(path, envelope)
    return path


def read_active_set(path: Path | str, coordinator_keys: TrustedKeys, now: datetime | None = None,
                    newer_than: int | None = None) -> ActiveSet:
    """`verify_active_set` on a file, with a one-line error for a missing or unreadable one."""
    path = Path(path)
    try:
        envelope = path.read_bytes()
    except OSError as error:
        raise ActiveSetError(f"{path}: cannot read the active set ({error.strerror or error})") from None
    return verify_active_set(envelope, coordinator_keys, now, newer_than)

