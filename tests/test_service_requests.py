"""Who may do what: every write must be signed by a registered member's key with a fresh nonce and a current
timestamp (else 401), acts on the member's own expert only (else 403); a damaged upload, a full disk and an
unreachable database are each refused in one line and store nothing."""

from __future__ import annotations

import hashlib
from collections import namedtuple
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from service_support import PostgresInstance, RunningService, new_postgres_database

from flexolmo.core.errors import ServiceError
from flexolmo.service import store
from flexolmo.service.app import create_app
from flexolmo.service.auth import HEADER_MEMBER, sign_request
from flexolmo.service.client import ConsortiumClient
from flexolmo.service.database import in_transaction, migrate, open_engine
from flexolmo.service.registry import add_member, initialise, revoke_member
from flexolmo.service.store import HEADER_DIGEST, pack_directory


@pytest.fixture
def service(tmp_path, tiny_anchor, service_keys):
    engine = open_engine(f"sqlite:///{tmp_path / 'db'}")
    migrate(engine)
    in_transaction(engine, lambda s: initialise(s, tiny_anchor, tmp_path / "store", service_keys / "coordinator.key"))
    for name in ("code", "math"):
        in_transaction(engine, lambda s, n=name: add_member(s, n, service_keys / f"{n}.pub"))
    client = TestClient(create_app(engine))
    client.engine = engine
    return client


def signed(keys, member: str, path: str, body: bytes = b"", key: str | None = None, **kwargs) -> dict:
    return sign_request(keys / f"{key or member}.key", member, "POST", path, body, **kwargs)


def refused(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert words in response.json()["error"] and "\n" not in response.json()["error"]


def test_unsigned_forged_stale_replayed_and_unknown_requests_are_refused(service, service_keys):
    path = "/v1/experts/code/withdraw"
    refused(service.post(path), 401, "unsigned request")
    refused(service.post(path, headers=signed(service_keys, "code", path, key="math")), 401, "does not verify")
    refused(service.post(path, headers=signed(service_keys, "code", "/v1/experts/math/withdraw")), 401,
            "does not verify")
    old = datetime.now(timezone.utc) - timedelta(minutes=6)
    refused(service.post(path, headers=signed(service_keys, "code", path, now=old)), 401, "stale")
    refused(service.post(path, headers={**signed(service_keys, "code", path), HEADER_MEMBER: "stranger"}), 401,
            "unknown or revoked member 'stranger'")
    headers = signed(service_keys, "code", path)
    refused(service.post(path, headers=headers), 404, "no admitted expert")
    refused(service.post(path, headers=headers), 401, "already used")


def test_a_revoked_member_is_refused_and_a_rotated_key_takes_over(service, service_keys):
    path = "/v1/experts/code/withdraw"
    in_transaction(service.engine, lambda s: revoke_member(s, "code"))
    refused(service.post(path, headers=signed(service_keys, "code", path)), 401, "unknown or revoked member 'code'")
    in_transaction(service.engine, lambda s: add_member(s, "code", service_keys / "hostile.pub"))  # rotation
    refused(service.post(path, headers=signed(service_keys, "code", path)), 401, "does not verify")
    refused(service.post(path, headers=signed(service_keys, "code", path, key="hostile")), 404, "no admitted expert")
    assert "key-rotated" in service.get("/").text and "member-revoked" in service.get("/").text


def test_a_member_acts_on_its_own_expert_only(service, service_keys, service_packages, tmp_path):
    path = "/v1/experts/math/withdraw"
    refused(service.post(path, headers=signed(service_keys, "code", path)), 403, "its own expert only")
    body = pack_directory(service_packages["math"])
    headers = {**signed(service_keys, "code", "/v1/submissions", body), HEADER_DIGEST: hashlib.sha256(body).hexdigest()}
    refused(service.post("/v1/submissions", content=body, headers=headers), 403, "cannot submit the expert 'math'")
    assert not list((tmp_path / "store").glob(".upload-*"))


def test_a_damaged_upload_and_a_full_disk_store_nothing(service, service_keys, service_packages, tmp_path,
                                                        monkeypatch):
    body = pack_directory(service_packages["code"])
    headers = {**signed(service_keys, "code", "/v1/submissions", body), HEADER_DIGEST: "0" * 64}
    refused(service.post("/v1/submissions", content=body, headers=headers), 422, "damaged in transit")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _path: usage(10 << 20, 10 << 20, 1024))
    headers = {**signed(service_keys, "code", "/v1/submissions", body), HEADER_DIGEST: hashlib.sha256(body).hexdigest()}
    refused(service.post("/v1/submissions", content=body, headers=headers), 413, "nothing was stored")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == []
    assert service.get("/v1/status").json()["submissions"] == []


def test_an_unreachable_database_is_one_clear_error():
    with pytest.raises(ServiceError,
                       match=r"cannot use the database postgresql\+psycopg://nobody@127.0.0.1:1/x: .*retry"):
        migrate(open_engine("postgresql+psycopg://nobody@127.0.0.1:1/x"))


def test_a_lost_database_is_a_clear_503_and_the_service_goes_on_once_it_is_back(tmp_path, tiny_anchor,
                                                                               service_keys):
    """PostgreSQL stops under a running service: requests get one line (503, "retry"), not a traceback, and
    once the server is back the same service answers again without a restart (its pool reconnects)."""
    postgres = PostgresInstance()
    postgres.start()
    try:
        engine = open_engine(new_postgres_database(postgres.url))
        migrate(engine)
        in_transaction(engine, lambda s: initialise(s, tiny_anchor, tmp_path / "store",
                                                    service_keys / "coordinator.key"))
        client = TestClient(create_app(engine, workers=0))
        assert client.get("/v1/status").status_code == 200
        postgres.stop()
        refused(client.get("/v1/status"), 503, "check that it runs, then retry")
        postgres.start()
        assert client.get("/v1/status").status_code == 200
    finally:
        postgres.remove()


def test_the_web_page_shows_the_consortium(service):
    page = service.get("/")
    assert page.status_code == 200 and "Active set version" in page.text and "<td>code</td>" in page.text


def test_an_interrupted_upload_resumes_where_it_stopped_and_only_its_member_may_touch_it(
        service, service_keys, service_packages, tmp_path, request):
    body = pack_directory(service_packages["code"])
    server = RunningService(service.engine)
    request.addfinalizer(server.close)
    client = ConsortiumClient(server.url, service_keys / "code.key", chunk_size=len(body) // 5 + 1)
    upload = client.upload(body, chunks=2)  # the connection drops after two chunks
    assert (tmp_path / "store" / "uploads" / f"{upload}.part").stat().st_size == 2 * client.chunk_size
    path = f"/v1/uploads/{upload}/0"
    refused(service.put(path, content=b"x", headers=sign_request(service_keys / "code.key", "code", "PUT", path, b"x")),
            409, f"send the chunk at offset {2 * client.chunk_size}")
    finish = f"/v1/uploads/{upload}/finish"
    refused(service.post(finish, headers=signed(service_keys, "code", finish)), 409, "send the rest first")
    refused(service.post(finish, headers=signed(service_keys, "math", finish)), 403, "its own uploads only")
    answer = client.submit(service_packages["code"])  # a new start finds the partial upload and sends the rest
    assert answer["status"] == "admitted" and answer["member"] == "code"
    assert not list((tmp_path / "store" / "uploads").iterdir())
