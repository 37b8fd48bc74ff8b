"""Publishing by policy: with `coordinator policy --publish-after N`, every Nth admission queues a publication
job (in the same transaction that records the admission), which a worker runs like any other job, so a
consortium can publish without its coordinator at the keyboard. N = 1 publishes on each admission; 0 (the
default) leaves publication to `coordinator publish`."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from flexolmo.service.audit import append_event
from flexolmo.service.database import in_transaction, optional_setting, put_setting
from flexolmo.service.errors import Conflict
from flexolmo.service.jobs import enqueue, finish
from flexolmo.service.models import Job
from flexolmo.service.settings import DEFAULT_TOP_K
from flexolmo.service.versions import publish

PUBLISH_AFTER, SINCE_PUBLISH, TOP_K = "publish_after", "admissions_since_publish", "publish_top_k"


def set_policy(session: Session, publish_after: int, top_k: int = DEFAULT_TOP_K) -> dict:
    if publish_after < 0 or top_k < 1:
        raise Conflict("--publish-after is 0 (only on command) or more admissions; --top-k at least 1")
    put_setting(session, PUBLISH_AFTER, str(publish_after))
    put_setting(session, TOP_K, str(top_k))
    put_setting(session, SINCE_PUBLISH, "0")
    policy = {"publish_after": publish_after, "top_k": top_k}
    append_event(session, "policy-set", "coordinator", policy)
    return policy


def count_admission(session: Session) -> Job | None:
    """Count one admission (in the caller's transaction); queue a publication when the policy says so."""
    every = int(optional_setting(session, PUBLISH_AFTER) or 0)
    if every <= 0:
        return None
    since = int(optional_setting(session, SINCE_PUBLISH) or 0) + 1
    due = since >= every
    put_setting(session, SINCE_PUBLISH, "0" if due else str(since))
    if not due:
        return None
    job = enqueue(session, "publish", {"top_k": int(optional_setting(session, TOP_K) or 2),
                                       "after_admissions": every})
    append_event(session, "publication-queued", "coordinator", {"job": job.id, "after_admissions": every})
    return job


def run_publication(engine: Engine, job: Job, owner: str, lease: timedelta) -> str:
    """Publish the next version for a policy job; inputs already published (a retried job) count as done."""
    try:
        outcome = f"version {publish(engine, json.loads(job.payload)['top_k'], lease)['number']}"
    except Conflict as error:
        outcome = f"nothing new to publish: {error}"
    in_transaction(engine, lambda session: finish(session, job.id, owner, error=None if outcome.startswith(
        "version") else outcome))
    return outcome
