"""Two service processes against one database (here: two threads, each with its own engine and connection
pool) publishing at the same moment: one version is published, the other publisher is refused because those
inputs are taken, and no version number is ever used twice. A publisher process killed with kill -9 in the
middle of its merge leaves no version, only its staging directory and reservation; while its lease runs the next
publisher is refused, after it the next publisher clears both and publishes that version."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from service_support import database_url, kill_9, start_hanging, submit_now
from sqlalchemy import select
from sqlalchemy.orm import Session

from flexolmo.core.errors import ServiceError
from flexolmo.service.audit import verify_log
from flexolmo.service.database import in_transaction, migrate, open_engine
from flexolmo.service.models import AuditEvent, Version
from flexolmo.service.registry import add_member, initialise
from flexolmo.service.versions import publish, release_stale, reserve, verify_version


def consortium(url: str, anchor, keys, packages, store) -> None:
    engine = open_engine(url)
    migrate(engine)
    in_transaction(engine, lambda s: initialise(s, anchor, store, keys / "coordinator.key"))
    for name in ("code", "math"):
        member = in_transaction(engine, lambda s, n=name: add_member(s, n, keys / f"{n}.pub"))
        assert submit_now(engine, member, packages[name])["status"] == "admitted"


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_two_publishers_at_once_publish_one_version_and_never_reuse_a_number(
        kind, request, tmp_path, tiny_anchor, service_keys, service_packages):
    url = database_url(kind, request, tmp_path)
    consortium(url, tiny_anchor, service_keys, service_packages, tmp_path / "store")
    engines = [open_engine(url) for _ in range(2)]
    barrier, results = threading.Barrier(2), []

    def publisher(engine) -> None:
        barrier.wait()
        try:
            results.append(publish(engine)["number"])
        except ServiceError as error:
            results.append(str(error))

    threads = [threading.Thread(target=publisher, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 in results and any("already published as version 1" in str(r) for r in results), results
    with Session(engines[0]) as session:
        assert [v.number for v in session.scalars(select(Version))] == [1]
    assert sorted(p.name for p in (tmp_path / "store" / "versions").iterdir()) == ["1"]


def test_a_killed_publishers_reservation_is_released_and_published_again(tmp_path, tiny_anchor, service_keys,
                                                                         service_packages):
    url = f"sqlite:///{tmp_path / 'db'}"
    consortium(url, tiny_anchor, service_keys, service_packages, tmp_path / "store")
    engine = open_engine(url)
    reserve(engine)  # as a publisher killed (kill -9) after reserving, before its merge finished
    (tmp_path / "store" / "versions" / ".1.staging").mkdir(parents=True)
    with pytest.raises(ServiceError, match="already published as version 1 \\(publishing\\)"):
        publish(engine)
    assert release_stale(engine, older_than=timedelta(0)) == [1]
    assert not (tmp_path / "store" / "versions" / ".1.staging").exists()
    assert publish(engine)["number"] == 1


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_a_publisher_killed_mid_merge_leaves_no_version_and_the_next_one_publishes_it(
        kind, request, tmp_path, tiny_anchor, service_keys, service_packages):
    url = database_url(kind, request, tmp_path)
    consortium(url, tiny_anchor, service_keys, service_packages, tmp_path / "store")
    engine, versions = open_engine(url), tmp_path / "store" / "versions"
    # Killed once the merge has written its first shard, before the index, the card and the rename.
    publisher = start_hanging("flexolmo.core.tensor_io:ShardedWriter._flush",
                              ["coordinator", "publish", "--db", url, "--lease-seconds", "4"], tmp_path / "merging")
    assert [p.name for p in (versions / ".1.staging").rglob(".shard-*")] == [".shard-00001.safetensors"]
    kill_9(publisher)
    assert sorted(p.name for p in versions.iterdir()) == [".1.staging"]  # no version 1, half a merge aside
    with Session(engine) as session:
        assert [(v.number, v.status) for v in session.scalars(select(Version))] == [(1, "publishing")]
    with pytest.raises(ServiceError, match="still working"):
        publish(engine)  # its lease still runs: a publisher that may be alive is not overtaken
    time.sleep(4.5)
    published = publish(engine)
    assert published["number"] == 1 and sorted(p.name for p in versions.iterdir()) == ["1"]
    verify_version(Path(published["path"]), service_keys / "coordinator.pub")
    with Session(engine) as session:
        kinds = [e.kind for e in session.scalars(select(AuditEvent).order_by(AuditEvent.seq))]
        released = [json.loads(e.payload) for e in session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "reservation-released"))]
    assert kinds[-2:] == ["reservation-released", "version-published"]
    assert released == [{"version": 1, "reason": "its publisher stopped renewing its lease"}]
    assert verify_log(engine).ok
