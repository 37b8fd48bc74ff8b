"""Signed requests: every member write carries a P-256 signature over what it asks and when.

The signed message is `METHOD \n PATH \n SHA-256(body) \n NONCE \n TIMESTAMP`, so a signature cannot be moved
to another endpoint, body or moment. The server refuses an unknown member, a bad signature, a timestamp more
than `MAX_SKEW` away from its clock, and a nonce the member has used before (stored with a unique constraint,
so two service processes cannot both accept one replay).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from flexolmo.service.errors import Unauthorized
from flexolmo.service.models import Member, Nonce
from flexolmo.trust.signing import load_private_key

MAX_SKEW = timedelta(minutes=5)
HEADER_MEMBER, HEADER_NONCE = "X-Flexolmo-Member", "X-Flexolmo-Nonce"
HEADER_TIME, HEADER_SIGNATURE = "X-Flexolmo-Timestamp", "X-Flexolmo-Signature"


def signed_message(method: str, path: str, body: bytes, nonce: str, timestamp: str) -> bytes:
    return "\n".join([method.upper(), path, hashlib.sha256(body).hexdigest(), nonce, timestamp]).encode()


def sign_request(key_path: Path, member: str, method: str, path: str, body: bytes,
                 now: datetime | None = None) -> dict[str, str]:
    """The headers that authenticate one request of `member`, signed with its private key."""
    nonce = secrets.token_hex(16)
    timestamp = (now or datetime.now(timezone.utc)).isoformat()
    signature = load_private_key(Path(key_path)).sign(signed_message(method, path, body, nonce, timestamp),
                                                      ec.ECDSA(hashes.SHA256()))
    return {HEADER_MEMBER: member, HEADER_NONCE: nonce, HEADER_TIME: timestamp,
            HEADER_SIGNATURE: base64.b64encode(signature).decode()}


def _check_time(timestamp: str, now: datetime) -> None:
    try:
        sent = datetime.fromisoformat(timestamp)
    except ValueError:
        raise Unauthorized(f"timestamp {timestamp!r} is not an ISO 8601 time") from None
    if sent.tzinfo is None or abs(now - sent) > MAX_SKEW:
        raise Unauthorized(f"stale or future timestamp {timestamp} (the service accepts "
                           f"{int(MAX_SKEW.total_seconds() // 60)} minutes either side of {now.isoformat()})")


def _check_signature(member: Member, message: bytes, signature: str) -> None:
    key = serialization.load_pem_public_key(member.public_key_pem.encode())
    try:
        key.verify(base64.b64decode(signature, validate=True), message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise Unauthorized(f"the signature does not verify with member '{member.name}''s key "
                           f"{member.key_id[:16]}...") from None


def authenticate(session: Session, headers, method: str, path: str, body: bytes) -> Member:
    """The member that signed this request, once its key, time and nonce pass; records the nonce."""
    missing = [h for h in (HEADER_MEMBER, HEADER_NONCE, HEADER_TIME, HEADER_SIGNATURE) if not headers.get(h)]
    if missing:
        raise Unauthorized(f"unsigned request: missing {', '.join(missing)}; sign it with the member's key")
    name, nonce, timestamp = headers[HEADER_MEMBER], headers[HEADER_NONCE], headers[HEADER_TIME]
    member = session.scalar(select(Member).where(Member.name == name))
    if member is None or member.status != "active":
        raise Unauthorized(f"unknown or revoked member '{name}'; the coordinator adds members with add-member")
    now = datetime.now(timezone.utc)
    _check_time(timestamp, now)
    _check_signature(member, signed_message(method, path, body, nonce, timestamp), headers[HEADER_SIGNATURE])
    try:
        with session.begin_nested():
            session.add(Nonce(member=name, nonce=nonce[:128], used_at=now.isoformat()))
    except IntegrityError:
        raise Unauthorized(f"nonce {nonce[:16]} was already used by '{name}': a replayed request is refused") \
            from None
    # A nonce older than the accepted skew can be forgotten: its request's signed timestamp is refused anyway.
    session.execute(delete(Nonce).where(Nonce.used_at < (now - 2 * MAX_SKEW).isoformat()))
    return member
