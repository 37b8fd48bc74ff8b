"""The worker: takes queued jobs (`jobs.claim`: admissions, and publications the policy queued) and runs
them until told to stop.

`flexolmo coordinator serve` runs one in a thread of the service process (`--workers N`), so a small
consortium needs one command; `flexolmo coordinator worker` runs one as a process of its own, for admissions
to run on other cores or machines than the HTTP service (they share the database and the package store). A
process can be killed at any moment: its job's lease runs out and the next worker takes it again.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import traceback
from datetime import timedelta

from sqlalchemy import Engine

from flexolmo.core.errors import FlexOlmoError
from flexolmo.service.database import in_transaction
from flexolmo.service.jobs import MAX_ATTEMPTS, Heartbeat, LeaseLost, claim, finish, release, renew_job
from flexolmo.service.policy import run_publication
from flexolmo.service.settings import LEASE
from flexolmo.service.submissions import give_up, run_admission, sweep

POLL_SECONDS = 1.0


class Worker:
    """One worker over `engine`; `wake` (when given) is set by the service when it queues a job."""

    def __init__(self, engine: Engine, lease: timedelta = LEASE, name: str | None = None,
                 wake: threading.Event | None = None):
        self.engine, self.lease = engine, lease
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.wake = wake or threading.Event()

    def run_once(self) -> bool:
        """Run one job if there is one; returns whether there was."""
        job = claim(self.engine, self.name, self.lease)
        if job is None:
            return False
        if job.attempts > MAX_ATTEMPTS:
            reason = (f"{job.kind} did not finish in {MAX_ATTEMPTS} attempts (its worker stopped or failed each "
                      f"time; last error: {job.error or 'none recorded'})")
            if job.kind == "admission":
                give_up(self.engine, job, self.name, reason)
            else:
                in_transaction(self.engine, lambda session: finish(session, job.id, self.name, "failed", reason))
            return True
        try:
            with Heartbeat(self.engine, renew_job(job.id, self.name), self.lease):
                if job.kind == "admission":
                    run_admission(self.engine, job, self.name)
                else:
                    print(f"worker {self.name}: published by policy: "
                          f"{run_publication(self.engine, job, self.name, self.lease)}", file=sys.stderr)
        except LeaseLost as error:
            print(f"worker {self.name}: {error}", file=sys.stderr)
        except Exception as error:  # noqa: BLE001 - a job's failure must not stop the worker
            detail = str(error) if isinstance(error, FlexOlmoError) else traceback.format_exc(limit=3)
            print(f"worker {self.name}: job {job.id} failed, queued again: {detail}", file=sys.stderr)
            release(self.engine, job.id, self.name, detail.strip().splitlines()[-1])
        return True

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set: jobs while there are any, then wait for a wake-up or the next poll."""
        try:
            sweep(self.engine)
        except FlexOlmoError as error:
            print(f"worker {self.name}: sweeping the incoming area failed: {error}", file=sys.stderr)
        while not stop.is_set():
            try:
                busy = self.run_once()
            except FlexOlmoError as error:  # the database or store is away: wait and try again
                print(f"worker {self.name}: {error}", file=sys.stderr)
                busy = False
            if not busy:
                self.wake.wait(POLL_SECONDS)
                self.wake.clear()


def run_pending(engine: Engine) -> int:
    """Run queued jobs in this thread until none is left; returns how many ran (tests, benchmarks)."""
    worker, count = Worker(engine), 0
    while worker.run_once():
        count += 1
    return count
