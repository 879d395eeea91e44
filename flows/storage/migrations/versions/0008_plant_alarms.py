"""One alarm for a plant-wide change: the episodes most lines started together, and each line's
episode pointing to it.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plant_alarms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.String(length=200), nullable=False),
        sa.Column("batch_id", sa.Integer(), sa.ForeignKey("batches.id"), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=True),
        sa.Column("start_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("entities", sa.JSON(), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("peak_ratio", sa.Float(), nullable=True),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_plant_alarms_sequence", "plant_alarms", ["sequence"])
    with op.batch_alter_table("anomaly_alarms") as batch:
        batch.add_column(sa.Column("plant_alarm_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_anomaly_alarms_plant_alarm_id", "plant_alarms", ["plant_alarm_id"], ["id"])
        batch.create_index("ix_anomaly_alarms_plant_alarm_id", ["plant_alarm_id"])


def downgrade() -> None:
    with op.batch_alter_table("anomaly_alarms") as batch:
        batch.drop_index("ix_anomaly_alarms_plant_alarm_id")
        batch.drop_constraint("fk_anomaly_alarms_plant_alarm_id", type_="foreignkey")
        batch.drop_column("plant_alarm_id")
    op.drop_index("ix_plant_alarms_sequence", table_name="plant_alarms")
    op.drop_table("plant_alarms")
