"""A submission's life: received (checked, put in the store's incoming area, queued, answered `pending` at
once), then admitted or refused by a worker (`worker`), which records the verdict with its reasons.

Receiving is cheap and synchronous: the upload's SHA-256, the tar's contents, and that the package is the
member's own (403 otherwise). Admission is the expensive part (verification, a scratch merge with the experts
admitted before, the public probe and the probe of each admitted member's domain) and runs as a job. An
admitted package is copied to its content address `packages/DIGEST` before the verdict is committed; the
incoming copy is deleted after it, so a worker killed at any point leaves either a job to retry or an incoming
copy that `sweep` removes, never an admitted row without its package.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from flexolmo.core.errors import PackageError
from flexolmo.owner.package import package_digest
from flexolmo.service.admission import Joined, Outcome, admit, check_owner
from flexolmo.service.audit import append_event, now_iso
from flexolmo.service.database import get_setting, in_transaction
from flexolmo.service.errors import NotFound, StoreUnavailable
from flexolmo.service.jobs import enqueue, finish
from flexolmo.service.member_proxies import probed_members
from flexolmo.service.models import Job, Member, Submission
from flexolmo.service.policy import count_admission
from flexolmo.service.registry import admission_probe, issue_active_set, proxy_public_text
from flexolmo.service.storage import configured
from flexolmo.service.store import check_digest, checked_digest, fetch_package, incoming_name, package_name, unpack

DECLARED = {"licence": 100, "data": 2000}  # what a member may declare, and at most how many characters


def answer(row: Submission) -> dict:
    return {"submission": row.id, "member": row.member, "package_sha256": row.package_sha256,
            "status": row.status, "report": json.loads(row.report), "declaration": json.loads(row.declaration or "{}")}


def checked_declaration(value: object) -> dict:
    """What a member may declare about its expert for the model card: `licence` (an SPDX identifier or a short
    name) and `data` (what it was trained on, in its owner's words); both optional, both plain text."""
    if value is None:
        return {}
    if not isinstance(value, dict) or set(value) - set(DECLARED):
        raise PackageError(f"a declaration holds only {', '.join(DECLARED)}, as text")
    declared = {}
    for key, limit in DECLARED.items():
        text = value.get(key)
        if text is None:
            continue
        if not isinstance(text, str) or len(text) > limit:
            raise PackageError(f"the declared {key} must be text of at most {limit} characters")
        declared[key] = " ".join(text.split())
    return declared


def _enqueue(session: Session, member: str, digest: str, token: str, declaration: dict) -> Submission:
    row = Submission(member=member, package_sha256=digest, stored_path=None, status="pending", report="{}",
                     created_at=now_iso(), declaration=json.dumps(declaration, sort_keys=True))
    session.add(row)
    session.flush()
    enqueue(session, "admission", {"submission": row.id, "incoming": token})
    append_event(session, "submission-received", member, {"submission": row.id, "package_sha256": digest,
                                                          "declaration": declaration})
    return row


def receive(engine: Engine, member: Member, body: bytes, claimed: str, declaration: dict | None = None) -> dict:
    """Check one upload and queue it for admission; the answer says `pending` and names the submission.
    `declaration` is the member's licence and data description, sent with its signed upload."""
    declaration = checked_declaration(declaration)
    with Session(engine) as session:
        store, work = configured(session)
    check_digest(body, claimed)
    scratch, token = unpack(body, work), uuid.uuid4().hex
    try:
        check_owner(scratch, member.name)
        digest = package_digest(scratch)
        store.put(incoming_name(token), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        row = in_transaction(engine, lambda session: _enqueue(session, member.name, digest, token, declaration))
    except BaseException:
        store.delete(incoming_name(token))
        raise
    return answer(row)


def submission(session: Session, number: int) -> dict:
    row = session.get(Submission, number)
    if row is None:
        raise NotFound(f"no submission {number}")
    return answer(row)


def _record(session: Session, job_id: int, owner: str, row_id: int, outcome: Outcome, location: str | None) -> None:
    """The verdict, in one transaction with closing the job (only if this worker still holds it)."""
    finish(session, job_id, owner)
    row = session.get(Submission, row_id)
    if outcome.admitted:
        for earlier in session.scalars(select(Submission).where(Submission.member == row.member,
                                                                Submission.status == "admitted")):
            earlier.status = "superseded"
    row.status, row.stored_path = ("admitted" if outcome.admitted else "refused"), location
    row.report = json.dumps(outcome.report, sort_keys=True)
    append_event(session, "admission-result", row.member, {"submission": row.id, "package_sha256": row.package_sha256,
                                                           "status": row.status, "report": outcome.report})
    if outcome.admitted:
        issue_active_set(session, f"admitted {row.member}")
        count_admission(session)


def run_admission(engine: Engine, job: Job, owner: str) -> str:
    """Admit or refuse the job's submission from the store's incoming copy; returns the verdict."""
    payload = json.loads(job.payload)
    with Session(engine) as session:
        row = session.get(Submission, payload["submission"])
        member = session.get(Member, row.member)
        anchor, (probe, no_probe_reason) = Path(get_setting(session, "anchor")), admission_probe(session)
        store, work = configured(session)
        members, public = probed_members(session, row.member), proxy_public_text(session)
    incoming = incoming_name(payload["incoming"])
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".admission-", dir=work))
    try:
        if not store.exists(incoming):
            raise StoreUnavailable(f"submission {row.id}'s package is gone from the store's {incoming}")
        package = checked_digest(store.fetch(incoming, scratch), row.package_sha256, f"submission {row.id}")
        joined = Joined([(other, fetch_package(store, other.package_sha256, work / "cache")) for other in members],
                        public)
        outcome = admit(package, member.name, member.public_key_pem, anchor, probe, no_probe_reason, joined)
        if outcome.admitted:
            store.copy(incoming, package_name(row.package_sha256))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    location = store.location(package_name(row.package_sha256)) if outcome.admitted else None
    in_transaction(engine, lambda session: _record(session, job.id, owner, row.id, outcome, location))
    store.delete(incoming)
    return "admitted" if outcome.admitted else "refused"


def give_up(engine: Engine, job: Job, owner: str, reason: str) -> None:
    """Refuse a submission whose admission kept failing, and drop its incoming copy."""
    payload = json.loads(job.payload)

    def record(session: Session) -> None:
        finish(session, job.id, owner, state="failed", error=reason)
        row = session.get(Submission, payload["submission"])
        row.status, row.report = "refused", json.dumps({"refused": reason})
        append_event(session, "admission-result", row.member, {"submission": row.id, "status": "refused",
                                                               "package_sha256": row.package_sha256,
                                                               "report": {"refused": reason}})

    in_transaction(engine, record)
    with Session(engine) as session:
        store, _ = configured(session)
    store.delete(incoming_name(payload["incoming"]))


def sweep(engine: Engine) -> list[str]:
    """Delete incoming copies whose job is over (left by a worker killed after recording its verdict). A copy
    with no job yet may be a submission being received this moment, so it is left alone."""
    with Session(engine) as session:
        store, _ = configured(session)
        closed = {json.loads(job.payload)["incoming"]
                  for job in session.scalars(select(Job).where(Job.state.in_(("done", "failed"))))}
    stale = [token for token in store.names("incoming") if token in closed]
    for token in stale:
        store.delete(incoming_name(token))
    return stale
