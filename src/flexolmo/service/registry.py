"""The consortium's state changes that are not publication or admission: initialisation, members,
withdrawals and the active set. Each runs in one transaction with its audit event."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from securesystemslib.dsse import Envelope
from sqlalchemy import select
from sqlalchemy.orm import Session

from flexolmo.coordinator.admission import recorded_public_heldout
from flexolmo.core.errors import DataError
from flexolmo.model.anchor import compute_fingerprint
from flexolmo.service.audit import append_event, log_head, now_iso
from flexolmo.service.database import get_setting, optional_setting, put_setting
from flexolmo.service.envelopes import RECEIPT_TYPE, sign_json
from flexolmo.service.errors import Conflict, Forbidden, NotFound
from flexolmo.service.models import ActiveSetRow, Member, Submission, Version
from flexolmo.service.storage import open_store, store_settings
from flexolmo.trust.active_set import ActiveExpert, new_active_set, sign_active_set
from flexolmo.trust.signing import key_id, load_private_key, load_public_key

ACTIVE_SET_LIFETIME = timedelta(hours=24)


def initialise(session: Session, anchor: Path, store: Path | str, coordinator_key: Path,
               probe_data: list[Path] | None = None, work_dir: Path | None = None,
               store_endpoint: str | None = None, public_data: list[Path] | None = None) -> dict:
    """Fix the anchor, the package store (a directory or `s3://BUCKET/PREFIX` at `store_endpoint`), the local
    work directory, the coordinator's key and (optionally) the public text admission probes with and the public
    text members' proxies are chosen from; refuse to re-initialise, and refuse a store that cannot be reached."""
    if session.get(ActiveSetRow, 1) is not None:
        raise Conflict("this database already holds a consortium; use another --db to start a new one")
    load_private_key(coordinator_key)
    settings = {"anchor": str(anchor.resolve()), **store_settings(store, work_dir, store_endpoint),
                "coordinator_key": str(coordinator_key.resolve()), "anchor_fingerprint": compute_fingerprint(anchor),
                "probe_data": json.dumps([str(path.resolve()) for path in probe_data or []]),
                "public_data": json.dumps([str(path.resolve()) for path in public_data or []])}
    missing = [str(path) for path in [*(probe_data or []), *(public_data or [])] if not path.is_file()]
    if missing:
        raise DataError(f"no such file: {', '.join(missing)}; check --probe-data and --public-data")
    open_store(settings["store"], store_endpoint).names("packages")  # reachable now, or refused now
    for key, value in settings.items():
        put_setting(session, key, value)
    Path(settings["work_dir"]).mkdir(parents=True, exist_ok=True)
    append_event(session, "initialised", "coordinator", settings)
    issue_active_set(session, "initialised")
    return settings


def admission_probe(session: Session) -> tuple[tuple[list[Path], str] | None, str]:
    """The public text admission probes with, as `flexolmo merge` chooses it: --probe-data given at init, else
    the held-out public text the anchor records; with the reason when there is none."""
    files = [Path(name) for name in json.loads(optional_setting(session, "probe_data") or "[]")]
    if files:
        return (files, "all"), ""
    anchor = Path(get_setting(session, "anchor"))
    return recorded_public_heldout(anchor), (f"{anchor} records no public held-out file that is present and "
                                             "unchanged, and the consortium was initialised without --probe-data")


def proxy_public_text(session: Session) -> list[Path]:
    """The public text members' proxies name documents of (--public-data at init); empty: members' domains are
    not probed."""
    return [Path(name) for name in json.loads(optional_setting(session, "public_data") or "[]")]


def add_member(session: Session, name: str, public_key: Path) -> Member:
    """Register `name` with its public key, or rotate the key of an existing member (both are events)."""
    pem = public_key.read_bytes().decode()
    identity = key_id(load_public_key(public_key))
    member = session.get(Member, name)
    kind = "key-rotated" if member is not None else "member-added"
    if member is None:
        member = Member(name=name, public_key_pem=pem, key_id=identity, status="active")
        session.add(member)
    else:
        member.public_key_pem, member.key_id, member.status = pem, identity, "active"
    append_event(session, kind, "coordinator", {"member": name, "key_id": identity})
    return member


def revoke_member(session: Session, name: str) -> None:
    member = _member(session, name)
    member.status = "revoked"
    append_event(session, "member-revoked", "coordinator", {"member": name, "key_id": member.key_id})


def _member(session: Session, name: str) -> Member:
    member = session.get(Member, name)
    if member is None:
        raise NotFound(f"no member '{name}'")
    return member


def active_submissions(session: Session) -> list[Submission]:
    """The admitted submission of each member whose expert is in the consortium now, by name."""
    rows = session.scalars(select(Submission).where(Submission.status == "admitted")
                           .order_by(Submission.member)).all()
    return list(rows)


def issue_active_set(session: Session, reason: str) -> int:
    """Sign and store a new active set (next version) from the admitted submissions; returns its version."""
    last = session.scalars(select(ActiveSetRow).order_by(ActiveSetRow.version.desc()).limit(1)).first()
    version = (last.version + 1) if last else 1
    experts = [ActiveExpert(name=s.member, package_sha256=s.package_sha256) for s in active_submissions(session)]
    withdrawn_rows = session.scalars(select(Submission).where(Submission.status == "withdrawn")
                                     .order_by(Submission.id)).all()
    withdrawn = list({s.member: ActiveExpert(name=s.member, package_sha256=s.package_sha256)
                      for s in withdrawn_rows if s.member not in {e.name for e in experts}}.values())
    active = new_active_set(version, get_setting(session, "anchor_fingerprint"), experts, ACTIVE_SET_LIFETIME,
                            withdrawn)
    envelope = sign_active_set(active, Path(get_setting(session, "coordinator_key")))
    session.add(ActiveSetRow(version=version, envelope=envelope.decode()))
    append_event(session, "active-set-issued", "coordinator", {
        "version": version, "reason": reason, "experts": [e.model_dump() for e in experts]})
    return version


def current_active_set(session: Session) -> ActiveSetRow:
    row = session.scalars(select(ActiveSetRow).order_by(ActiveSetRow.version.desc()).limit(1)).first()
    if row is None:
        raise Conflict("no active set yet: run `flexolmo coordinator init` first")
    return row


def withdraw(session: Session, actor: Member, name: str) -> dict:
    """Take `name`'s expert out now: new active set, earlier versions marked withdrawn, a signed receipt."""
    if actor.name != name:
        raise Forbidden(f"member '{actor.name}' cannot withdraw '{name}': a member acts on its own expert only")
    current = [s for s in active_submissions(session) if s.member == name]
    if not current:
        raise NotFound(f"'{name}' has no admitted expert to withdraw")
    for row in current:
        row.status = "withdrawn"
    version = issue_active_set(session, f"withdrew {name}")
    marked = _mark_versions_withdrawn(session, name)
    append_event(session, "withdrawal", name, {"expert": name, "package_sha256": current[0].package_sha256,
                                               "active_set_version": version, "versions_withdrawn": marked})
    receipt = {"type": "flexolmo-withdrawal-receipt", "expert": name,
               "package_sha256": current[0].package_sha256, "unused_from_active_set_version": version,
               "versions_withdrawn": marked, "withdrawn_at": now_iso(), "log_head": log_head(session)}
    return sign_json(receipt, RECEIPT_TYPE, Path(get_setting(session, "coordinator_key")))


def _mark_versions_withdrawn(session: Session, name: str) -> list[int]:
    marked = []
    for version in session.scalars(select(Version).where(Version.status == "published")):
        if name in {expert["name"] for expert in json.loads(version.experts)}:
            version.status = "withdrawn"
            marked.append(version.number)
    return sorted(marked)


def renew_if_due(session: Session) -> ActiveSetRow:
    """The current active set, re-issued first when less than half its lifetime is left, so a server that
    follows it never has to fail closed on an expired set while the service runs."""
    row = current_active_set(session)
    payload = json.loads(Envelope.from_dict(json.loads(row.envelope)).payload)
    expires = datetime.fromisoformat(payload["expires_at"])
    if expires - datetime.now(timezone.utc) < ACTIVE_SET_LIFETIME / 2:
        issue_active_set(session, "renewed")
        row = current_active_set(session)
    return row
