"""The package store, local directory or S3 bucket (moto's S3 server, started on 127.0.0.1 by the fixture):
the same round trip through the real service on both. Owners upload over HTTP; the worker reads each package
back from the store's incoming area, checked against its digest; the admitted one is kept under its content
digest and nothing else, the refused one leaves nothing stored; a publication reads its inputs from the store
and verifies; an object changed in the store after admission is refused by its digest."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import pytest
from service_support import RunningService
from sqlalchemy.orm import Session

from flexolmo.core.errors import ServiceError
from flexolmo.owner.package import PACKAGE_FILES, package_digest
from flexolmo.service.client import ConsortiumClient
from flexolmo.service.database import in_transaction, migrate, open_engine
from flexolmo.service.registry import add_member, initialise
from flexolmo.service.storage import configured
from flexolmo.service.store import fetch_package, package_name
from flexolmo.service.versions import publish, verify_version


def store_url(kind: str, request, tmp_path) -> tuple[str, str | None]:
    if kind == "local":
        return str(tmp_path / "store"), None
    endpoint, bucket = request.getfixturevalue("s3_endpoint"), f"flexolmo-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/consortium", endpoint


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_the_store_keeps_admitted_packages_by_digest_and_nothing_of_a_refused_one(
        kind, request, tmp_path, tiny_anchor, service_keys, service_packages):
    url, endpoint = store_url(kind, request, tmp_path)
    engine = open_engine(f"sqlite:///{tmp_path / 'db'}")
    migrate(engine)
    in_transaction(engine, lambda s: initialise(s, tiny_anchor, url, service_keys / "coordinator.key",
                                                work_dir=tmp_path / "work", store_endpoint=endpoint))
    for name in ("code", "hostile"):
        in_transaction(engine, lambda s, n=name: add_member(s, n, service_keys / f"{n}.pub"))
    with Session(engine) as session:
        store, work = configured(session)
    assert store.url == url and work == tmp_path / "work"

    service = RunningService(engine)
    try:
        code = ConsortiumClient(service.url, service_keys / "code.key")
        queued = code.submit(service_packages["code"], wait=False)
        assert queued["status"] == "pending"
        assert code.verdict(queued["submission"])["status"] == "admitted"
        refused = ConsortiumClient(service.url, service_keys / "hostile.key").submit(service_packages["hostile"])
        assert refused["status"] == "refused" and "router rows are" in refused["report"]["refused"]
    finally:
        service.close()

    digest = package_digest(service_packages["code"])
    assert store.names("packages") == [digest]  # the refused package left nothing
    assert store.names("incoming") == []
    assert store.exists(package_name(digest)) and not store.exists(package_name(refused["package_sha256"]))
    fetched = fetch_package(store, digest, tmp_path / "fetched")
    assert sorted(p.name for p in fetched.iterdir()) == sorted(PACKAGE_FILES)
    assert package_digest(fetched) == digest

    version = publish(engine)  # the merge reads its input from the store
    statement = verify_version(Path(version["path"]),
                               service_keys / "coordinator.pub")
    assert statement["predicate"]["inputs"] == [{"name": "code", "digest": {"sha256": digest}}]

    # Content addressing: an object changed in the store is refused on its way out.
    if kind == "s3":
        bucket, prefix = url.removeprefix("s3://").split("/", 1)
        boto3.client("s3", endpoint_url=endpoint).put_object(
            Bucket=bucket, Key=f"{prefix}/packages/{digest}/manifest.json", Body=b'{"changed": true}')
    else:
        (tmp_path / "store" / "packages" / digest / "manifest.json").write_text('{"changed": true}')
    with pytest.raises(ServiceError, match="changed after it was stored"):
        fetch_package(store, digest, tmp_path / "fetched-again")


def test_an_unreachable_bucket_is_refused_at_init_in_one_line(request, tmp_path, tiny_anchor, service_keys):
    endpoint = request.getfixturevalue("s3_endpoint")
    engine = open_engine(f"sqlite:///{tmp_path / 'db'}")
    migrate(engine)
    with pytest.raises(ServiceError, match=r"cannot list packages in the package store s3://no-such-bucket/x"):
        in_transaction(engine, lambda s: initialise(s, tiny_anchor, "s3://no-such-bucket/x",
                                                    service_keys / "coordinator.key", store_endpoint=endpoint))
