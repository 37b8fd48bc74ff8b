"""The first schema: settings, members, submissions, versions, active sets, nonces and the audit log."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("settings", sa.Column("key", sa.String(64), primary_key=True),
                    sa.Column("value", sa.Text, nullable=False))
    op.create_table("members", sa.Column("name", sa.String(64), primary_key=True),
                    sa.Column("public_key_pem", sa.Text, nullable=False),
                    sa.Column("key_id", sa.String(64), nullable=False, unique=True),
                    sa.Column("status", sa.String(16), nullable=False))
    op.create_table("submissions", sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("member", sa.String(64), sa.ForeignKey("members.name"), nullable=False),
                    sa.Column("package_sha256", sa.String(64), nullable=False),
                    sa.Column("stored_path", sa.Text, nullable=True),
                    sa.Column("status", sa.String(16), nullable=False),
                    sa.Column("report", sa.Text, nullable=False),
                    sa.Column("created_at", sa.String(40), nullable=False))
    op.create_table("versions", sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
                    sa.Column("inputs_sha256", sa.String(64), nullable=False, unique=True),
                    sa.Column("experts", sa.Text, nullable=False),
                    sa.Column("output_sha256", sa.String(64), nullable=True),
                    sa.Column("path", sa.Text, nullable=True),
                    sa.Column("status", sa.String(16), nullable=False),
                    sa.Column("created_at", sa.String(40), nullable=False))
    op.create_table("active_sets", sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
                    sa.Column("envelope", sa.Text, nullable=False))
    op.create_table("nonces", sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("member", sa.String(64), nullable=False),
                    sa.Column("nonce", sa.String(128), nullable=False),
                    sa.Column("used_at", sa.String(40), nullable=False),
                    sa.UniqueConstraint("member", "nonce"))
    op.create_table("audit_log", sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
                    sa.Column("time", sa.String(40), nullable=False),
                    sa.Column("kind", sa.String(32), nullable=False),
                    sa.Column("actor", sa.String(64), nullable=False),
                    sa.Column("payload", sa.Text, nullable=False),
                    sa.Column("prev_hash", sa.String(64), nullable=False),
                    sa.Column("hash", sa.String(64), nullable=False, unique=True))


def downgrade() -> None:
    for table in ("audit_log", "nonces", "active_sets", "versions", "submissions", "members", "settings"):
        op.drop_table(table)
