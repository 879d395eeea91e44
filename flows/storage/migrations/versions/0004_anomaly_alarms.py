"""Anomaly alarms: each line's detector state and a table of its alarms.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("entity_state") as batch:
        batch.add_column(sa.Column("alarm_state", sa.LargeBinary(), nullable=True))
    op.create_table(
        "anomaly_alarms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.String(length=200), nullable=False),
        sa.Column("entity", sa.String(length=200), nullable=False),
        sa.Column("batch_id", sa.Integer(), sa.ForeignKey("batches.id"), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=True),
        sa.Column("start_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("peak_score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("model_version", sa.String(length=50), nullable=True),
        sa.Column("update_index", sa.Integer(), nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_anomaly_alarms_entity", "anomaly_alarms", ["entity"])
    op.create_index("ix_anomaly_alarms_sequence", "anomaly_alarms", ["sequence"])


def downgrade() -> None:
    op.drop_index("ix_anomaly_alarms_sequence", table_name="anomaly_alarms")
    op.drop_index("ix_anomaly_alarms_entity", table_name="anomaly_alarms")
    op.drop_table("anomaly_alarms")
    with op.batch_alter_table("entity_state") as batch:
        batch.drop_column("alarm_state")
