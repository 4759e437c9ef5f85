"""preference metrics on metric rows: rewards chosen/rejected, margin and accuracy (train and eval)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    "rewards_chosen",
    "rewards_rejected",
    "rewards_margin",
    "rewards_accuracy",
    "eval_rewards_margin",
    "eval_rewards_accuracy",
)


def upgrade() -> None:
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
