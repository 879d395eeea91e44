"""Quarantine at the granularity of the fault: rows of one line taken out of a file that goes
on, and the exact duplicate rows a file's lines resent.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("rows_duplicate", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "line_quarantines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), sa.ForeignKey("batches.id"), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("entity", sa.String(length=200), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("sample_rows", sa.JSON(), nullable=True),
        sa.Column("rows_file", sa.Text(), nullable=True),
        sa.Column("validation_page", sa.Text(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_line_quarantines_batch_id", "line_quarantines", ["batch_id"])
    op.create_index("ix_line_quarantines_entity", "line_quarantines", ["entity"])


def downgrade() -> None:
    op.drop_index("ix_line_quarantines_entity", table_name="line_quarantines")
    op.drop_index("ix_line_quarantines_batch_id", table_name="line_quarantines")
    op.drop_table("line_quarantines")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("rows_duplicate")
