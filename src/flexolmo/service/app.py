"""The HTTP service (FastAPI): members submit and withdraw over signed requests; anyone reads the status,
the active set and the web page. Publication is the coordinator's command on the same database, not an
endpoint, so no coordinator key ever has to be sent over the network.

Every refusal is JSON `{"error": "<one line>"}` with the status of its `ServiceError` (401 unsigned, replayed
or stale; 403 another member's expert; 404; 409; 413), 422 for a package refused as malformed, and 503 when
the database cannot be reached (the request may be retried).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastapi import Body, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from flexolmo.core.errors import FlexOlmoError, PackageError, ServiceError
from flexolmo.service.admission import admit, check_owner
from flexolmo.service.auth import authenticate
from flexolmo.service.database import get_setting, in_transaction, unreachable
from flexolmo.service.models import Member
from flexolmo.service.page import render_page
from flexolmo.service.registry import admission_probe, record_submission, renew_if_due, withdraw
from flexolmo.service.status import status
from flexolmo.service.store import HEADER_DIGEST, check_digest, keep, unpack
from flexolmo.service.uploads import put_chunk, start_upload, take_upload


def _authenticated(engine: Engine, request: Request, body: bytes) -> Member:
    """Authenticate and spend the nonce in its own transaction, so even a failed request cannot be replayed."""
    return in_transaction(engine, lambda session: authenticate(session, request.headers, request.method,
                                                               request.url.path, body), attempts=1)


def submit(engine: Engine, member: Member, body: bytes, claimed: str) -> dict:
    """Check, unpack, admit and record one upload; a refused package leaves only its record."""
    with Session(engine) as session:
        anchor, store = Path(get_setting(session, "anchor")), Path(get_setting(session, "store"))
        probe, no_probe_reason = admission_probe(session)
    check_digest(body, claimed)
    scratch = unpack(body, store)
    try:
        check_owner(scratch, member.name)
        outcome = admit(scratch, member.name, member.public_key_pem, anchor, probe, no_probe_reason)
        stored = keep(scratch, store, outcome.digest) if outcome.admitted else None
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    row = in_transaction(engine, lambda session: record_submission(session, member.name, outcome.digest, stored,
                                                                   outcome.report))
    return {"submission": row.id, "member": row.member, "package_sha256": row.package_sha256,
            "status": row.status, "report": outcome.report}


def _store(engine: Engine) -> Path:
    with Session(engine) as session:
        return Path(get_setting(session, "store"))


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except json.JSONDecodeError:
        raise PackageError("the request body must be JSON: {\"sha256\": ..., \"size\": ...}") from None
    if not isinstance(value, dict):
        raise PackageError("the request body must be a JSON object")
    return value


def _error(error: Exception, engine: Engine) -> JSONResponse:
    if isinstance(error, OperationalError):
        return JSONResponse({"error": str(unreachable(engine, error))}, status_code=503)
    code = error.status if isinstance(error, ServiceError) else 422
    return JSONResponse({"error": str(error)}, status_code=code)


def create_app(engine: Engine) -> FastAPI:
    """The service over `engine` (already migrated and initialised)."""
    app = FastAPI(title="FlexOlmo consortium")

    @app.exception_handler(FlexOlmoError)
    async def _refused(_request: Request, error: FlexOlmoError) -> JSONResponse:
        return _error(error, engine)

    @app.exception_handler(OperationalError)
    async def _database(_request: Request, error: OperationalError) -> JSONResponse:
        return _error(error, engine)

    @app.post("/v1/submissions")
    def post_submission(request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        return submit(engine, member, body, request.headers.get(HEADER_DIGEST, ""))

    @app.post("/v1/uploads")
    def post_upload(request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        declared = _json(body)
        return start_upload(_store(engine), member.name, str(declared.get("sha256", "")),
                            int(declared.get("size", 0)))

    @app.put("/v1/uploads/{upload}/{offset}")
    def put_upload(upload: str, offset: int, request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        return put_chunk(_store(engine), member.name, upload, offset, body)

    @app.post("/v1/uploads/{upload}/finish")
    def finish_upload(upload: str, request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        package, sha256 = take_upload(_store(engine), member.name, upload)
        return submit(engine, member, package, sha256)

    @app.post("/v1/experts/{name}/withdraw")
    def post_withdrawal(name: str, request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        return in_transaction(engine, lambda session: withdraw(session, member, name))

    @app.get("/v1/status")
    def get_status() -> dict:
        with Session(engine) as session:
            return status(session)

    @app.get("/v1/active-set")
    def get_active_set() -> Response:
        return Response(in_transaction(engine, renew_if_due).envelope, media_type="application/json")

    @app.get("/", response_class=HTMLResponse)
    def get_page() -> str:
        with Session(engine) as session:
            return render_page(status(session, with_log=True))

    return app
