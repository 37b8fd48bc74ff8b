"""The service's tables (SQLAlchemy 2). The schema itself is created by the Alembic migrations in
`migrations/`, never by `create_all`, so a database made by one release upgrades in place under the next.

Unique constraints carry the invariants two service processes must never break, whatever they interleave:
one row per version number, one version per set of inputs, one use per (member, nonce), one audit row per seq; a job's
lease is taken by a conditional update, so only one worker's claim succeeds.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """The declarative base of every service table."""


class Setting(Base):
    """What `coordinator init` fixed (anchor, store, coordinator key): every later command reads it from here."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Member(Base):
    """A data owner, named as its expert, with the public key that signs its requests and packages."""

    __tablename__ = "members"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key_pem: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    # The member's proxy file as it sent it (JSON, `flexolmo select-proxy`): public documents like its data, by
    # hash, with which admission probes its domain when another member's expert joins. None: not probed.
    proxies: Mapped[str | None] = mapped_column(Text, nullable=True)


class Submission(Base):
    """One uploaded package and what admission made of it; a refused one keeps no stored path."""

    __tablename__ = "submissions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    member: Mapped[str] = mapped_column(ForeignKey("members.name"))
    package_sha256: Mapped[str] = mapped_column(String(64))
    stored_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16))  # pending, admitted, refused, withdrawn, superseded
    report: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[str] = mapped_column(String(40))
    # JSON {licence, data}: what the member declared with its signed upload, printed in the model card.
    declaration: Mapped[str | None] = mapped_column(Text, nullable=True)


class Version(Base):
    """A published (or being published) model version; `inputs_sha256` names its set of inputs."""

    __tablename__ = "versions"
    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    inputs_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    experts: Mapped[str] = mapped_column(Text)  # JSON list of {name, package_sha256}
    output_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16))  # publishing, published, withdrawn
    created_at: Mapped[str] = mapped_column(String(40))
    # While publishing: until when its publisher holds it (renewed as it works); past it, the publisher is dead.
    lease_until: Mapped[str | None] = mapped_column(String(40), nullable=True)


class Job(Base):
    """Work for a worker (admitting one submission, publishing by policy): claimed with a lease, so a job runs in one
    worker at a time and a dead worker's job is taken again once its lease has run out."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # admission, publish
    payload: Mapped[str] = mapped_column(Text)  # JSON: what the job works on
    state: Mapped[str] = mapped_column(String(16))  # queued, running, done, failed
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the worker holding the lease
    lease_until: Mapped[str | None] = mapped_column(String(40), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[str] = mapped_column(String(40))


class ActiveSetRow(Base):
    """Every signed active set ever issued; the highest version is the current one."""

    __tablename__ = "active_sets"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    envelope: Mapped[str] = mapped_column(Text)


class Nonce(Base):
    """A request nonce already used by a member: a replayed request collides with this row."""

    __tablename__ = "nonces"
    __table_args__ = (UniqueConstraint("member", "nonce"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    member: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[str] = mapped_column(String(128))
    used_at: Mapped[str] = mapped_column(String(40))


class AuditEvent(Base):
    """One row of the append-only, hash-chained audit log (see `audit`)."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
