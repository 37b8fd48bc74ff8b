"""The audit log: append-only and hash-chained, one row per event, in the same transaction as the event.

Row `seq` holds its time, kind, actor and payload (JSON), the previous row's hash and its own hash: SHA-256
over all of these. Editing a row breaks its hash; reordering or deleting one breaks the chain (seq must run
1, 2, 3, ... and each `prev_hash` must be its predecessor's hash); deleting the last rows is caught against the
log head kept in the settings table and written with every event. Someone able to rewrite the whole table
*and* the head can forge a history, which is why receipts carry the head they were issued at: an owner holds
a signed point of the chain that the coordinator can no longer rewrite unnoticed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from flexolmo.service.database import put_setting
from flexolmo.service.models import AuditEvent, Setting

GENESIS = "0" * 64
HEAD_KEY = "log_head"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def row_hash(seq: int, time: str, kind: str, actor: str, payload: str, prev_hash: str) -> str:
    """The hash that chains a row: over every field but itself, in a fixed JSON form."""
    body = json.dumps({"seq": seq, "time": time, "kind": kind, "actor": actor, "payload": payload,
                       "prev_hash": prev_hash}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def append_event(session: Session, kind: str, actor: str, payload: dict) -> AuditEvent:
    """Add one event at the end of the chain; two concurrent appends collide on `seq` and one retries."""
    last = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).first()
    seq, prev = (last.seq + 1, last.hash) if last else (1, GENESIS)
    time, body = now_iso(), json.dumps(payload, sort_keys=True)
    row = AuditEvent(seq=seq, time=time, kind=kind, actor=actor, payload=body, prev_hash=prev,
                     hash=row_hash(seq, time, kind, actor, body, prev))
    session.add(row)
    put_setting(session, HEAD_KEY, f"{seq}:{row.hash}")
    return row


def log_head(session: Session) -> dict:
    """The log's last (seq, hash), as receipts name it."""
    last = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).first()
    return {"seq": last.seq, "hash": last.hash} if last else {"seq": 0, "hash": GENESIS}


@dataclass
class LogCheck:
    """What `verify_log` found: how many rows, and every problem (empty when the log is intact)."""

    rows: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _rows(engine: Engine, batch: int = 5000) -> Iterator[AuditEvent]:
    """Every row in seq order, a batch at a time, so 100,000 events need little memory."""
    after = 0
    with Session(engine) as session:
        while True:
            rows = session.scalars(select(AuditEvent).where(AuditEvent.seq > after)
                                   .order_by(AuditEvent.seq).limit(batch)).all()
            if not rows:
                return
            yield from rows
            after = rows[-1].seq
            session.expunge_all()


def _check_row(row: AuditEvent, expected_seq: int, prev: str) -> str | None:
    if row.seq != expected_seq:
        return f"row {row.seq} found where row {expected_seq} should be: a row was deleted or reordered"
    if row.prev_hash != prev:
        return f"row {row.seq} does not follow row {row.seq - 1} (prev_hash differs): rows were reordered or replaced"
    if row.hash != row_hash(row.seq, row.time, row.kind, row.actor, row.payload, row.prev_hash):
        return f"row {row.seq} ({row.kind}) was edited: its hash does not match its contents"
    return None


def verify_log(engine: Engine) -> LogCheck:
    """Walk the chain from the first row and compare its end with the recorded head."""
    problems, prev, count = [], GENESIS, 0
    for row in _rows(engine):
        count += 1
        problem = _check_row(row, count, prev)
        if problem:
            problems.append(problem)
            break
        prev = row.hash
    with Session(engine) as session:
        head = session.scalar(select(Setting.value).where(Setting.key == HEAD_KEY))
        total = session.scalar(select(func.count()).select_from(AuditEvent))
    if not problems and head is not None and head != f"{count}:{prev}":
        problems.append(f"the log ends at row {count} but its head says {head.split(':')[0]}: rows were deleted "
                        "from its end")
    return LogCheck(total or 0, problems)


def export_log(engine: Engine, out: Path) -> int:
    """Write every row as one JSON line; returns how many."""
    count = 0
    with out.open("w") as handle:
        for row in _rows(engine):
            handle.write(json.dumps({"seq": row.seq, "time": row.time, "kind": row.kind, "actor": row.actor,
                                     "payload": json.loads(row.payload), "prev_hash": row.prev_hash,
                                     "hash": row.hash}, sort_keys=True) + "\n")
            count += 1
    return count
