"""Jobs claimed with a lease, so work survives a killed worker and is never run by two at once.

A worker claims the oldest job that is queued, or running under a lease that has run out (its worker died),
by a conditional UPDATE: on SQLite writers are serialised, and on PostgreSQL a second UPDATE of the same row
waits for the first and re-checks the condition, so exactly one claim succeeds. While it works, the worker
renews its lease (`Heartbeat`); its result is recorded only by an UPDATE fenced on its own name and a running
state (`finish`), in the same transaction as the result itself, so a worker that lost its lease (paused past
it) cannot record a second result. A job whose workers died `MAX_ATTEMPTS` times is given up.

The same lease guards a version being published (`versions`): its row carries `lease_until`, renewed by the
publisher, and a later publisher clears a reservation whose lease ran out.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy import Engine, and_, or_, select, update
from sqlalchemy.orm import Session

from flexolmo.core.errors import ServiceError
from flexolmo.service.audit import now_iso
from flexolmo.service.database import in_transaction
from flexolmo.service.models import Job
from flexolmo.service.settings import LEASE

MAX_ATTEMPTS = 3


class LeaseLost(ServiceError):
    """This worker's lease ran out and another took the job: its result must not be recorded."""

    status = 409


def lease_time(after: timedelta = timedelta(0)) -> str:
    """A time as the lease columns hold it (ISO 8601 UTC, always with microseconds, so strings compare)."""
    return (datetime.now(timezone.utc) + after).isoformat(timespec="microseconds")


def enqueue(session: Session, kind: str, payload: dict) -> Job:
    job = Job(kind=kind, payload=json.dumps(payload, sort_keys=True), state="queued", attempts=0,
              created_at=now_iso())
    session.add(job)
    session.flush()
    return job


def _claimable(now: str):
    return or_(Job.state == "queued", and_(Job.state == "running", Job.lease_until < now))


def claim(engine: Engine, owner: str, lease: timedelta = LEASE) -> Job | None:
    """The job this worker now holds, or None when there is none to take."""
    def take(session: Session) -> Job | None | bool:
        now = lease_time()
        job_id = session.scalar(select(Job.id).where(_claimable(now)).order_by(Job.id).limit(1))
        if job_id is None:
            return None
        taken = session.execute(update(Job).where(Job.id == job_id, _claimable(now)).values(
            state="running", owner=owner, lease_until=lease_time(lease), attempts=Job.attempts + 1))
        return session.get(Job, job_id) if taken.rowcount == 1 else False

    for _ in range(8):  # another worker took that one first: look for the next
        job = in_transaction(engine, take)
        if job is not False:
            return job
    return None


def finish(session: Session, job_id: int, owner: str, state: str = "done", error: str | None = None) -> None:
    """Close the job in the caller's transaction, only if this worker still holds it (else `LeaseLost`)."""
    closed = session.execute(update(Job).where(Job.id == job_id, Job.owner == owner, Job.state == "running")
                             .values(state=state, lease_until=None, error=error))
    if closed.rowcount != 1:
        raise LeaseLost(f"job {job_id}'s lease passed to another worker; this worker's result is dropped")


def release(engine: Engine, job_id: int, owner: str, error: str) -> None:
    """Put a job that failed here back in the queue at once (for another attempt), if still held."""
    in_transaction(engine, lambda session: session.execute(
        update(Job).where(Job.id == job_id, Job.owner == owner, Job.state == "running")
        .values(state="queued", owner=None, lease_until=None, error=error)))


class Heartbeat:
    """Renews a lease every third of its length while the work inside `with` runs; `renew(session)` returns
    whether the lease was still held (when not, `lost` is set and renewal stops)."""

    def __init__(self, engine: Engine, renew: Callable[[Session, str], bool], lease: timedelta = LEASE):
        self.engine, self.renew, self.lease = engine, renew, lease
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease.total_seconds() / 3):
            try:
                held = in_transaction(self.engine, lambda session: self.renew(session, lease_time(self.lease)))
            except ServiceError as error:  # the database is away: keep trying while the lease lasts
                print(f"lease renewal failed: {error}", file=sys.stderr)
                continue
            if not held:
                self.lost = True
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


def renew_job(job_id: int, owner: str) -> Callable[[Session, str], bool]:
    def renew(session: Session, until: str) -> bool:
        return session.execute(update(Job).where(Job.id == job_id, Job.owner == owner, Job.state == "running")
                               .values(lease_until=until)).rowcount == 1
    return renew
