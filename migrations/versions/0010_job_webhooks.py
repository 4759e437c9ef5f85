"""job webhook delivery: state (pending, delivered, failed), next attempt, delivery record

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("webhook_state", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("webhook_next_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("webhook_delivery", sa.JSON(), nullable=True))
        batch_op.create_index("ix_jobs_webhook_state", ["webhook_state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_webhook_state")
        batch_op.drop_column("webhook_delivery")
        batch_op.drop_column("webhook_next_at")
        batch_op.drop_column("webhook_state")
