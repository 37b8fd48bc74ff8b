"""The owner's side of the service over HTTP (httpx): signed submissions and withdrawals, status reads.

A refusal by the service comes back as its one-line `error` and is raised as a `ServiceError`, so the CLI
prints it like any other flexolmo error.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx

from flexolmo.core.errors import ServiceError
from flexolmo.service.auth import sign_request
from flexolmo.service.store import HEADER_DIGEST, pack_directory
from flexolmo.trust.signing import key_name

CHUNK_BYTES = 8 << 20
TIMEOUT = httpx.Timeout(600.0, connect=10.0)
WAIT_SECONDS = 3600.0


class ConsortiumClient:
    """One member's (or an anonymous reader's) connection to a consortium service at `url`."""

    def __init__(self, url: str, key_path: Path | None = None, chunk_size: int = CHUNK_BYTES):
        self.url = url.rstrip("/")
        self.chunk_size = chunk_size
        self.key_path = Path(key_path) if key_path else None
        self.member = key_name(key_path) if key_path else None
        self._http = httpx.Client(base_url=self.url, timeout=TIMEOUT)

    def _answer(self, response: httpx.Response) -> dict:
        try:
            answer = response.json()
        except json.JSONDecodeError:
            raise ServiceError(f"{self.url} answered {response.status_code} without JSON") from None
        if response.status_code >= 400:
            raise ServiceError(f"{self.url} refused ({response.status_code}): {answer.get('error', answer)}")
        return answer

    def _signed(self, method: str, path: str, body: bytes, extra: dict | None = None) -> dict:
        if self.key_path is None or self.member is None:
            raise ServiceError("a write must be signed: pass --sign-key NAME.key")
        headers = {**sign_request(self.key_path, self.member, method, path, body), **(extra or {})}
        try:
            return self._answer(self._http.request(method, path, content=body, headers=headers))
        except httpx.TransportError as error:
            raise ServiceError(f"cannot reach the consortium service at {self.url}: {error}") from None

    def submit_whole(self, package: Path) -> dict:
        """One request with the whole package (small packages; what `curl` users do)."""
        body = pack_directory(Path(package))
        return self._signed("POST", "/v1/submissions", body, {HEADER_DIGEST: hashlib.sha256(body).hexdigest()})

    def upload(self, body: bytes, chunks: int | None = None, declaration: dict | None = None) -> str:
        """Send `body` in chunks from wherever an earlier, interrupted upload of it stopped; returns its id.
        `chunks` stops after that many chunks (as a dropped connection would); `declaration` (licence, data
        description) travels in the signed request that starts the upload."""
        declared = json.dumps({"sha256": hashlib.sha256(body).hexdigest(), "size": len(body),
                               "declaration": declaration or {}}).encode()
        state = self._signed("POST", "/v1/uploads", declared)
        sent = 0
        while state["received"] < len(body) and (chunks is None or sent < chunks):
            offset = state["received"]
            state = self._signed("PUT", f"/v1/uploads/{state['upload']}/{offset}",
                                 body[offset:offset + self.chunk_size])
            sent += 1
        return state["upload"]

    def submit(self, package: Path, wait: bool = True, timeout: float = WAIT_SECONDS,
               declaration: dict | None = None) -> dict:
        """Upload the package in resumable chunks, then submit it; the answer says `pending`, and with `wait`
        this waits for a worker's verdict and returns it with its reasons. `declaration`: the licence and
        data description the model card will print, e.g. {"licence": "CC-BY-4.0", "data": "..."}."""
        upload = self.upload(pack_directory(Path(package)), declaration=declaration)
        answer = self._signed("POST", f"/v1/uploads/{upload}/finish", b"")
        return self.verdict(answer["submission"], timeout) if wait else answer

    def verdict(self, submission: int, timeout: float = WAIT_SECONDS) -> dict:
        """The submission once admitted or refused: polled every 50 ms for the first seconds (a small expert's
        admission takes well under a second), then less and less often, up to every 2 s."""
        start = time.monotonic()
        pause = 0.05
        while True:
            answer = self.get(f"/v1/submissions/{submission}")
            if answer["status"] != "pending":
                return answer
            waited = time.monotonic() - start
            if waited > timeout:
                raise ServiceError(f"submission {submission} is still pending after {timeout:.0f} s; its verdict "
                                   f"will be at {self.url}/v1/submissions/{submission}")
            time.sleep(pause)
            if waited > 2.0:
                pause = min(pause * 1.5, 2.0)

    def send_proxies(self, proxies: Path) -> dict:
        """Send this member's proxy file (`flexolmo select-proxy`), with which admission probes its domain when
        another member's expert joins; it replaces the one sent before."""
        try:
            body = Path(proxies).read_bytes()
        except OSError as error:
            raise ServiceError(f"{proxies}: cannot read the proxy file ({error.strerror}); check the path") from None
        return self._signed("PUT", f"/v1/members/{self.member}/proxies", body)

    def withdraw(self, name: str) -> dict:
        return self._signed("POST", f"/v1/experts/{name}/withdraw", b"")

    def get(self, path: str) -> dict:
        try:
            return self._answer(self._http.get(path))
        except httpx.TransportError as error:
            raise ServiceError(f"cannot reach the consortium service at {self.url}: {error}") from None

    def status(self) -> dict:
        return self.get("/v1/status")

    def active_set(self) -> bytes:
        """The signed envelope exactly as served (verify it with `trust.active_set.verify_active_set`)."""
        try:
            response = self._http.get("/v1/active-set")
        except httpx.TransportError as error:
            raise ServiceError(f"cannot reach the consortium service at {self.url}: {error}") from None
        self._answer(response)
        return response.content
