"""Two service processes against one database (here: two threads, each with its own engine and connection
pool) publishing at the same moment: one version is published, the other publisher is refused because those
inputs are taken, and no version number is ever used twice; a reservation left by a killed publisher is
released and the version published on the next try."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from service_support import database_url, submit_now
from sqlalchemy import select
from sqlalchemy.orm import Session

from flexolmo.core.errors import ServiceError
from flexolmo.service.database import in_transaction, migrate, open_engine
from flexolmo.service.models import Version
from flexolmo.service.registry import add_member, initialise
from flexolmo.service.versions import publish, release_stale, reserve


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
