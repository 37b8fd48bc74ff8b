"""Opening the service's database, migrating it with Alembic, and its settings.

A SQLite file by default (nothing to install), PostgreSQL (or any SQLAlchemy URL) when it grows. The schema
is created and upgraded by the migrations inside this package, run programmatically, so `coordinator init`
and every later command agree on it without an `alembic.ini` on disk.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from flexolmo.core.errors import ServiceError
from flexolmo.service.errors import Conflict
from flexolmo.service.models import Setting

T = TypeVar("T")
ATTEMPTS = 8
# Lock conflicts between writers that a retry resolves (SQLite, PostgreSQL), as opposed to a lost server.
_TRANSIENT = ("database is locked", "could not serialize", "deadlock detected")
_MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(connection, _record) -> None:
    """Wait for a writer instead of failing at once, and keep foreign keys honest."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA busy_timeout = 30000")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def open_engine(url: str) -> Engine:
    """An engine for `url`; a lost connection is re-established on the next use (pool_pre_ping)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def describe_url(engine: Engine) -> str:
    """The database URL with any password hidden, for messages."""
    return engine.url.render_as_string(hide_password=True)


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except OperationalError as error:
        raise unreachable(engine, error) from None


def unreachable(engine: Engine, error: Exception) -> ServiceError:
    """A lost or refused database connection as one line (the caller may retry)."""
    first = str(getattr(error, "orig", error)).strip().splitlines()[0] if str(error).strip() else "no detail"
    return ServiceError(f"cannot use the database {describe_url(engine)}: {first}; check that it runs, then retry")


def get_setting(session: Session, key: str) -> str:
    value = session.scalar(select(Setting.value).where(Setting.key == key))
    if value is None:
        raise Conflict(f"the consortium is not initialised (no '{key}'): run `flexolmo coordinator init` first")
    return value


def put_setting(session: Session, key: str, value: str) -> None:
    session.merge(Setting(key=key, value=value))


def optional_setting(session: Session, key: str) -> str | None:
    return session.scalar(select(Setting.value).where(Setting.key == key))


def in_transaction(engine: Engine, action: Callable[[Session], T], attempts: int = ATTEMPTS) -> T:
    """Run `action` in one transaction, retried when another writer took the same row first (a unique
    constraint: the next audit seq, version number) or held a lock; a lost database is one clear error."""
    for attempt in range(attempts):
        try:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                return action(session)
        except IntegrityError as error:
            if attempt == attempts - 1:
                raise Conflict(f"another writer kept changing the same rows ({str(error.orig).splitlines()[0]}); "
                               "retry") from None
        except OperationalError as error:
            if not any(words in str(error) for words in _TRANSIENT) or attempt == attempts - 1:
                raise unreachable(engine, error) from None
        time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
    raise AssertionError("unreachable")
