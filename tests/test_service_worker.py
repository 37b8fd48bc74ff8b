"""Admission in the background, on SQLite and PostgreSQL: a submission is answered `pending` at once and a
worker records the verdict; a worker killed (kill -9) after measuring but before recording leaves its job to
the next worker, which runs it once more after the lease has run out; two workers with their own engines on one
database never run a job twice, and a worker whose lease was taken over cannot record its result. With a
publication policy the workers publish a version after every N admissions."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from service_support import RunningService, database_url, kill_9, start_hanging
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flexolmo.cli import main
from flexolmo.service import submissions
from flexolmo.service.audit import verify_log
from flexolmo.service.client import ConsortiumClient
from flexolmo.service.database import in_transaction, migrate, open_engine
from flexolmo.service.jobs import LeaseLost, claim, finish
from flexolmo.service.models import AuditEvent, Job, Submission, Version
from flexolmo.service.registry import add_member, initialise
from flexolmo.service.store import pack_directory
from flexolmo.service.versions import verify_version
from flexolmo.service.worker import Worker, run_pending


def consortium(url: str, anchor, keys, tmp_path):
    engine = open_engine(url)
    migrate(engine)
    in_transaction(engine, lambda s: initialise(s, anchor, tmp_path / "store", keys / "coordinator.key"))
    members = {n: in_transaction(engine, lambda s, n=n: add_member(s, n, keys / f"{n}.pub")) for n in ("code", "math")}
    return engine, members


def receive(engine, member, package) -> dict:
    import hashlib

    body = pack_directory(package)
    return submissions.receive(engine, member, body, hashlib.sha256(body).hexdigest())


def results(engine) -> list[dict]:
    with Session(engine) as session:
        return [json.loads(e.payload) for e in session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "admission-result").order_by(AuditEvent.seq))]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_submission_is_pending_until_a_worker_process_admits_it(
        kind, request, tmp_path, tiny_anchor, service_keys, service_packages):
    url = database_url(kind, request, tmp_path)
    engine, _ = consortium(url, tiny_anchor, service_keys, tmp_path)
    service = RunningService(engine, workers=0)  # no worker in the service: only a process of its own admits
    try:
        client = ConsortiumClient(service.url, service_keys / "code.key")
        started = time.monotonic()
        queued = client.submit(service_packages["code"], wait=False)
        assert queued["status"] == "pending" and time.monotonic() - started < 30
        assert client.status()["submissions"][0]["status"] == "pending"
        with Session(engine) as session:
            assert [(j.kind, j.state) for j in session.scalars(select(Job))] == [("admission", "queued")]
        worker = start_hanging("flexolmo.service.worker:Worker.run_once",
                               ["coordinator", "worker", "--db", url], tmp_path / "worked")
        kill_9(worker)  # it finished its one job first
        assert client.verdict(queued["submission"], timeout=5)["status"] == "admitted"
    finally:
        service.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_worker_killed_mid_admission_leaves_its_job_to_the_next_worker(
        kind, request, tmp_path, tiny_anchor, service_keys, service_packages):
    url = database_url(kind, request, tmp_path)
    engine, members = consortium(url, tiny_anchor, service_keys, tmp_path)
    queued = receive(engine, members["code"], service_packages["code"])
    worker = start_hanging("flexolmo.service.submissions:admit",
                           ["coordinator", "worker", "--db", url, "--lease-seconds", "3"], tmp_path / "measured")
    kill_9(worker)  # measured, not recorded
    with Session(engine) as session:
        job = session.scalars(select(Job)).one()
        assert (job.state, job.attempts) == ("running", 1)
        assert session.get(Submission, queued["submission"]).status == "pending"
    assert run_pending(engine) == 0  # its lease still runs: nobody takes the job yet
    time.sleep(3.5)
    assert run_pending(engine) == 1
    with Session(engine) as session:
        job = session.scalars(select(Job)).one()
        assert (job.state, job.attempts) == ("done", 2)
        assert session.get(Submission, queued["submission"]).status == "admitted"
    assert [r["status"] for r in results(engine)] == ["admitted"]  # one verdict recorded, not two
    assert not list((tmp_path / "store" / "incoming").iterdir())
    assert verify_log(engine).ok


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_two_workers_on_one_database_never_run_a_job_twice(
        kind, request, tmp_path, tiny_anchor, service_keys, service_packages, monkeypatch):
    url = database_url(kind, request, tmp_path)
    engine, members = consortium(url, tiny_anchor, service_keys, tmp_path)
    queued = [receive(engine, members[name], service_packages[name])["submission"]
              for name in ("code", "math") * 3]
    ran, admit = [], submissions.admit

    def counted(package, member, *args):
        ran.append((member, threading.current_thread().name))
        time.sleep(0.2)  # long enough that both workers are busy at once
        return admit(package, member, *args)

    monkeypatch.setattr(submissions, "admit", counted)
    workers = [Worker(open_engine(url), name=f"worker-{i}") for i in range(2)]
    barrier = threading.Barrier(2)

    def drain(worker: Worker) -> None:
        barrier.wait()
        while worker.run_once():
            pass

    threads = [threading.Thread(target=drain, args=(w,), name=w.name) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ran) == len(queued) and {name for _, name in ran} == {"worker-0", "worker-1"}, ran
    with Session(engine) as session:
        assert {(j.state, j.attempts) for j in session.scalars(select(Job))} == {("done", 1)}
        assert sorted(r["submission"] for r in results(engine)) == queued
    assert verify_log(engine).ok


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_worker_whose_lease_was_taken_over_cannot_record_its_result(
        kind, request, tmp_path, tiny_anchor, service_keys, service_packages):
    engine, members = consortium(database_url(kind, request, tmp_path), tiny_anchor, service_keys, tmp_path)
    receive(engine, members["code"], service_packages["code"])
    slow = claim(engine, "slow", lease=timedelta(milliseconds=1))
    time.sleep(0.01)
    fast = claim(engine, "fast")
    assert fast.id == slow.id and fast.attempts == 2
    with pytest.raises(LeaseLost, match="passed to another worker"):
        in_transaction(engine, lambda session: finish(session, slow.id, "slow"))
    in_transaction(engine, lambda session: finish(session, fast.id, "fast"))
    assert claim(engine, "third") is None


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_policy_publishes_after_every_n_admissions_through_the_workers(
        kind, request, tmp_path, tiny_anchor, service_keys, service_packages):
    url = database_url(kind, request, tmp_path)
    engine, members = consortium(url, tiny_anchor, service_keys, tmp_path)
    assert main(["coordinator", "policy", "--publish-after", "2", "--db", url]) == 0
    receive(engine, members["code"], service_packages["code"])
    assert run_pending(engine) == 1  # one admission: no publication yet
    receive(engine, members["math"], service_packages["math"])
    assert run_pending(engine) == 2  # the second admission queued a publication, which a worker ran
    with Session(engine) as session:
        versions = session.scalars(select(Version)).all()
        kinds = [e.kind for e in session.scalars(select(AuditEvent).order_by(AuditEvent.seq))]
    assert [(v.number, v.status, [e["name"] for e in json.loads(v.experts)]) for v in versions] == [
        (1, "published", ["code", "math"])]
    verify_version(Path(versions[0].path), service_keys / "coordinator.pub")
    assert kinds.index("policy-set") < kinds.index("publication-queued") < kinds.index("version-published")

    assert main(["coordinator", "policy", "--publish-after", "1", "--db", url]) == 0
    receive(engine, members["code"], service_packages["code"])  # the same package again: same inputs
    assert run_pending(engine) == 2
    with Session(engine) as session:
        last = session.scalars(select(Job).order_by(Job.id.desc())).first()
        assert session.scalar(select(func.count()).select_from(Version)) == 1
    assert (last.kind, last.state) == ("publish", "done") and "already published as version 1" in last.error
    assert verify_log(engine).ok
