"""Alembic's environment: migrate the connection `database.migrate` hands over in `config.attributes`."""

from __future__ import annotations

from alembic import context

from flexolmo.service.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
