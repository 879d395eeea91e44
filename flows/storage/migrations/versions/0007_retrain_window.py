"""Retraining beside ingestion: which file part a decision's window ended at, and which one
its challenger had caught up to when it was swapped in.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("retrain_decisions") as batch:
        batch.add_column(sa.Column("window_sequence", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("swapped_at_sequence", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("retrain_decisions") as batch:
        batch.drop_column("swapped_at_sequence")
        batch.drop_column("window_sequence")
