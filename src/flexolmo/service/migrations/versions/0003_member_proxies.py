"""Each member's proxy file (`flexolmo select-proxy`), which admission probes that member's domain with, and
the public text the proxies are resolved in (a setting, no schema)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("members") as batch:
        batch.add_column(sa.Column("proxies", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("members") as batch:
        batch.drop_column("proxies")
