"""The HTTP service (FastAPI): members submit, send their proxies and withdraw over signed requests; anyone
reads the status, a submission's verdict, the active set and the web page. A submission is answered `pending` at
once and admitted by a worker (`worker`), in a thread of this process or in `coordinator worker` processes.
Publication is the coordinator's command on the same database, not an endpoint, so no coordinator key ever has
to be sent over the network.

Every refusal is JSON `{"error": "<one line>"}` with the status of its `ServiceError` (401 unsigned, replayed
or stale; 403 another member's expert; 404; 409; 413), 422 for a package refused as malformed, and 503 when
the database cannot be reached (the request may be retried).
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

from fastapi import Body, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from flexolmo.core.errors import FlexOlmoError, PackageError, ServiceError
from flexolmo.service.auth import authenticate
from flexolmo.service.database import in_transaction, unreachable
from flexolmo.service.errors import Forbidden
from flexolmo.service.member_proxies import receive_proxies
from flexolmo.service.models import Member
from flexolmo.service.page import render_page
from flexolmo.service.registry import renew_if_due, withdraw
from flexolmo.service.settings import DEFAULTS, LEASE
from flexolmo.service.status import status
from flexolmo.service.storage import work_dir
from flexolmo.service.store import HEADER_DIGEST
from flexolmo.service.submissions import checked_declaration, receive, submission
from flexolmo.service.uploads import put_chunk, start_upload, take_upload
from flexolmo.service.worker import Worker


def _authenticated(engine: Engine, request: Request, body: bytes) -> Member:
    """Authenticate and spend the nonce in its own transaction, so even a failed request cannot be replayed."""
    return in_transaction(engine, lambda session: authenticate(session, request.headers, request.method,
                                                               request.url.path, body), attempts=1)


def _work(engine: Engine) -> Path:
    with Session(engine) as session:
        return work_dir(session)


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


def _lifespan(engine: Engine, workers: int, lease: timedelta, wake: threading.Event, stop: threading.Event):
    """Start `workers` admission workers in threads with the app, and stop them (waiting) when it stops."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threads = [threading.Thread(target=Worker(engine, lease, wake=wake).run, args=(stop,), daemon=True,
                                    name=f"admission-worker-{index}") for index in range(workers)]
        for thread in threads:
            thread.start()
        yield
        stop.set()
        wake.set()
        for thread in threads:
            thread.join(timeout=120)

    return lifespan


def _member_routes(app: FastAPI, engine: Engine, wake: threading.Event) -> None:
    """What a member does, each request signed by its key: submit (at once or by resumable upload), send its
    proxies, withdraw."""

    def queued(answer: dict) -> dict:
        wake.set()
        return answer

    @app.post("/v1/submissions")
    def post_submission(request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        return queued(receive(engine, member, body, request.headers.get(HEADER_DIGEST, "")))

    @app.post("/v1/uploads")
    def post_upload(request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        declared = _json(body)
        return start_upload(_work(engine), member.name, str(declared.get("sha256", "")),
                            int(declared.get("size", 0)), checked_declaration(declared.get("declaration")))

    @app.put("/v1/uploads/{upload}/{offset}")
    def put_upload(upload: str, offset: int, request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        return put_chunk(_work(engine), member.name, upload, offset, body)

    @app.post("/v1/uploads/{upload}/finish")
    def finish_upload(upload: str, request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        package, sha256, declaration = take_upload(_work(engine), member.name, upload)
        return queued(receive(engine, member, package, sha256, declaration))

    @app.put("/v1/members/{name}/proxies")
    def put_proxies(name: str, request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        if member.name != name:
            raise Forbidden(f"member '{member.name}' cannot send the proxies of '{name}': a member sends its own")
        return receive_proxies(engine, member, body)

    @app.post("/v1/experts/{name}/withdraw")
    def post_withdrawal(name: str, request: Request, body: bytes = Body(b"")) -> dict:
        member = _authenticated(engine, request, body)
        return in_transaction(engine, lambda session: withdraw(session, member, name))


def _public_routes(app: FastAPI, engine: Engine) -> None:
    """What anyone may read: a submission's state, the consortium's status, the signed active set, the page."""

    @app.get("/v1/submissions/{number}")
    def get_submission(number: int) -> dict:
        with Session(engine) as session:
            return submission(session, number)

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


def create_app(engine: Engine, workers: int = DEFAULTS.workers, lease: timedelta = LEASE) -> FastAPI:
    """The service over `engine` (already migrated and initialised), with `workers` admission workers in
    threads of this process (0: only separate `coordinator worker` processes admit)."""
    wake, stop = threading.Event(), threading.Event()
    app = FastAPI(title="FlexOlmo consortium", lifespan=_lifespan(engine, workers, lease, wake, stop))

    @app.exception_handler(FlexOlmoError)
    async def _refused(_request: Request, error: FlexOlmoError) -> JSONResponse:
        return _error(error, engine)

    @app.exception_handler(OperationalError)
    async def _database(_request: Request, error: OperationalError) -> JSONResponse:
        return _error(error, engine)

    _member_routes(app, engine, wake)
    _public_routes(app, engine)
    return app
