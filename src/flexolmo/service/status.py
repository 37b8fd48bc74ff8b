"""What anyone may read about the consortium: members, submissions with their admission reports, versions,
withdrawals, the current active set version, and (for the web page) the audit log."""

from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from flexolmo.service.member_proxies import proxies_summary
from flexolmo.service.models import AuditEvent, Member, Submission, Version
from flexolmo.service.registry import current_active_set

LOG_ROWS_SHOWN = 200


def _submission(row: Submission) -> dict:
    return {"id": row.id, "member": row.member, "package_sha256": row.package_sha256, "status": row.status,
            "created_at": row.created_at, "report": json.loads(row.report),
            "declaration": json.loads(row.declaration or "{}")}


def _version(row: Version) -> dict:
    return {"number": row.number, "status": row.status, "experts": json.loads(row.experts),
            "output_sha256": row.output_sha256, "created_at": row.created_at}


def _log(session: Session) -> list[dict]:
    rows = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(LOG_ROWS_SHOWN)).all()
    return [{"seq": r.seq, "time": r.time, "kind": r.kind, "actor": r.actor, "payload": r.payload,
             "hash": r.hash} for r in rows]


def status(session: Session, with_log: bool = False) -> dict:
    members = session.scalars(select(Member).order_by(Member.name)).all()
    result = {
        "members": [{"name": m.name, "key_id": m.key_id, "status": m.status, "proxies": proxies_summary(m)}
                    for m in members],
        "submissions": [_submission(r) for r in session.scalars(select(Submission).order_by(Submission.id))],
        "versions": [_version(r) for r in session.scalars(select(Version).order_by(Version.number))],
        "active_set_version": current_active_set(session).version,
    }
    result["withdrawals"] = [s for s in result["submissions"] if s["status"] == "withdrawn"]
    if with_log:
        result["log"] = _log(session)
    return result
