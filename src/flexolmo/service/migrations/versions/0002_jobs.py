"""Admission as background jobs claimed with a lease, a publisher's lease on the version it publishes, and
the licence and data description a member declares with its submission."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("jobs", sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("kind", sa.String(16), nullable=False),
                    sa.Column("payload", sa.Text, nullable=False),
                    sa.Column("state", sa.String(16), nullable=False),
                    sa.Column("owner", sa.String(64), nullable=True),
                    sa.Column("lease_until", sa.String(40), nullable=True),
                    sa.Column("attempts", sa.Integer, nullable=False),
                    sa.Column("error", sa.Text, nullable=True),
                    sa.Column("created_at", sa.String(40), nullable=False))
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("lease_until", sa.String(40), nullable=True))
    with op.batch_alter_table("submissions") as batch:
        batch.add_column(sa.Column("declaration", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("submissions") as batch:
        batch.drop_column("declaration")
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("lease_until")
    op.drop_table("jobs")
