"""Alembic migrations of the service's database, run by `database.migrate` (never by hand)."""
