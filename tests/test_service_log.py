"""The audit log: an intact chain verifies on SQLite and PostgreSQL, and any edited, reordered or deleted row
is found (the rows are changed in the SQLite file directly, as someone with the database would)."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
from service_support import database_url
from sqlalchemy.orm import Session

from flexolmo.service.audit import append_event, export_log, verify_log
from flexolmo.service.database import in_transaction, migrate, open_engine


def logged(url: str, events: int = 6):
    engine = open_engine(url)
    migrate(engine)
    migrate(engine)  # a second run finds the schema current and changes nothing
    for index in range(events):
        in_transaction(engine, lambda s, i=index: append_event(s, "test", "member-a", {"index": i}))
    return engine


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_intact_log_verifies_and_exports_as_json_lines(kind, request, tmp_path):
    engine = logged(database_url(kind, request, tmp_path))
    check = verify_log(engine)
    assert check.ok and check.rows == 6
    assert export_log(engine, tmp_path / "log.jsonl") == 6
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["seq"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all(rows[i]["prev_hash"] == rows[i - 1]["hash"] for i in range(1, 6))


@pytest.mark.parametrize("change, found", [
    ("UPDATE audit_log SET payload = '{\"index\": 99}' WHERE seq = 3", "row 3 (test) was edited"),
    ("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 1", "row 1 (test) was edited"),
    ("DELETE FROM audit_log WHERE seq = 4", "row 5 found where row 4 should be"),
    ("DELETE FROM audit_log WHERE seq = 6", "rows were deleted from its end"),
    (("UPDATE audit_log SET seq = -seq WHERE seq IN (2, 3); UPDATE audit_log SET seq = 3 WHERE seq = -2; "
      "UPDATE audit_log SET seq = 2 WHERE seq = -3"), "row 2 does not follow row 1"),
])
def test_an_edited_reordered_or_deleted_row_is_found(change, found, tmp_path):
    engine = logged(f"sqlite:///{tmp_path / 'db'}")
    with sqlite3.connect(tmp_path / "db") as connection:
        connection.executescript(change)
    check = verify_log(engine)
    assert not check.ok and found in check.problems[0], check.problems


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_writers_with_their_own_engines_never_break_the_chain(kind, request, tmp_path):
    url = database_url(kind, request, tmp_path)
    logged(url, events=1)
    engines = [open_engine(url) for _ in range(3)]
    barrier = threading.Barrier(len(engines))

    def write(engine) -> None:
        barrier.wait()
        for index in range(15):
            in_transaction(engine, lambda s, i=index: append_event(s, "race", "writer", {"index": i}))

    threads = [threading.Thread(target=write, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    check = verify_log(engines[0])
    assert check.ok and check.rows == 1 + 3 * 15, check.problems
    with Session(engines[0]) as session:
        assert session.connection().exec_driver_sql("SELECT count(DISTINCT seq) FROM audit_log").scalar() == 46


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_the_migrations_build_exactly_the_tables_the_models_declare(kind, request, tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from flexolmo.service.models import Base

    engine = open_engine(database_url(kind, request, tmp_path))
    migrate(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert [d for d in differences if d[0] != "remove_table" or d[1].name != "alembic_version"] == []
