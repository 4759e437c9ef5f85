"""idempotency keys for uploads: a key names a job or an uploaded file

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.alter_column(
            "job_id", existing_type=sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True
        )
        batch_op.add_column(
            sa.Column("file_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True)
        )
        batch_op.create_index(batch_op.f("ix_idempotency_keys_file_id"), ["file_id"], unique=False)
        batch_op.create_foreign_key(
            "fk_idempotency_keys_file_id", "files", ["file_id"], ["id"], ondelete="CASCADE"
        )
        batch_op.create_check_constraint(
            "ck_idempotency_keys_one_target", "(job_id IS NULL) <> (file_id IS NULL)"
        )


def downgrade() -> None:
    # Keys of uploads have no job to point at: they go, as they would with their file.
    op.execute("DELETE FROM idempotency_keys WHERE job_id IS NULL")
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_constraint("ck_idempotency_keys_one_target", type_="check")
        batch_op.drop_constraint("fk_idempotency_keys_file_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_idempotency_keys_file_id"))
        batch_op.drop_column("file_id")
        batch_op.alter_column(
            "job_id", existing_type=sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False
        )
