"""The package store in an S3-compatible bucket (AWS S3, MinIO, Ceph, moto's server): `s3://BUCKET/PREFIX`.

A package directory `NAME` is the objects `PREFIX/NAME/FILE`, one per package file. Every object is written
with an S3 SHA-256 checksum, so the service refuses a body damaged on its way in, and every package read back
is checked against its content digest (`store.checked_digest`). S3 has no rename: admitting a package is a
server-side copy from `incoming/` to `packages/DIGEST/` followed by deleting the incoming objects.
Credentials come from boto3's usual chain (environment, config files, instance roles); none is stored.
"""

from __future__ import annotations

from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from flexolmo.service.errors import StoreUnavailable
from flexolmo.service.store import PackageStore


class S3Store(PackageStore):
    """Package directories as objects under `s3://BUCKET/PREFIX`, at `endpoint` (None: AWS itself)."""

    def __init__(self, url: str, endpoint: str | None = None):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise StoreUnavailable(f"{url!r} names no bucket: write s3://BUCKET/PREFIX")
        self.url, self.bucket, self.prefix, self.endpoint = url, bucket, prefix.strip("/"), endpoint
        self.client = boto3.client("s3", endpoint_url=endpoint,
                                   config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def _key(self, name: str, file: str = "") -> str:
        return "/".join(part for part in (self.prefix, name, file) if part)

    def _failed(self, error: Exception, doing: str) -> StoreUnavailable:
        where = f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint}" if self.endpoint else "")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return StoreUnavailable(f"cannot {doing} in the package store {where}: {first}; check the bucket and "
                                "its credentials, then retry")

    def _keys(self, name: str) -> list[str]:
        prefix, keys = self._key(name) + "/", []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def put(self, name: str, directory: Path) -> None:
        try:
            self.delete(name)
            for path in sorted(Path(directory).iterdir()):
                with path.open("rb") as body:
                    self.client.put_object(Bucket=self.bucket, Key=self._key(name, path.name), Body=body,
                                           ChecksumAlgorithm="SHA256")
        except (BotoCoreError, ClientError) as error:
            raise self._failed(error, f"store {name}") from None

    def fetch(self, name: str, scratch: Path) -> Path:
        target = Path(scratch) / Path(name).name
        target.mkdir(parents=True, exist_ok=True)
        try:
            keys = self._keys(name)
            if not keys:
                raise StoreUnavailable(f"the store {self.url} holds no {name}")
            for key in keys:
                self.client.download_file(self.bucket, key, str(target / key.rsplit("/", 1)[1]))
        except (BotoCoreError, ClientError) as error:
            raise self._failed(error, f"read {name}") from None
        return target

    def copy(self, source: str, target: str) -> None:
        try:
            for key in self._keys(source):
                file = key.rsplit("/", 1)[1]
                self.client.copy_object(Bucket=self.bucket, Key=self._key(target, file),
                                        CopySource={"Bucket": self.bucket, "Key": key}, ChecksumAlgorithm="SHA256")
        except (BotoCoreError, ClientError) as error:
            raise self._failed(error, f"copy {source} to {target}") from None

    def delete(self, name: str) -> None:
        try:
            keys = self._keys(name)
            for start in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": key} for key in keys[start:start + 1000]], "Quiet": True})
        except (BotoCoreError, ClientError) as error:
            raise self._failed(error, f"delete {name}") from None

    def exists(self, name: str) -> bool:
        try:
            return bool(self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(name) + "/",
                                                    MaxKeys=1).get("KeyCount", 0))
        except (BotoCoreError, ClientError) as error:
            raise self._failed(error, f"look up {name}") from None

    def names(self, area: str) -> list[str]:
        prefix, found = self._key(area) + "/", set()
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                              Delimiter="/"):
                found |= {item["Prefix"][len(prefix):].rstrip("/") for item in page.get("CommonPrefixes", [])}
        except (BotoCoreError, ClientError) as error:
            raise self._failed(error, f"list {area}") from None
        return sorted(found)
