"""Per-file fleet processing: drift detector state per line, one metrics row per committed part.

The drift detectors carry their statistics per line (entity_state.drift_state) instead of
re-reading each line's last output files, and MLflow tracking reads one row per committed file
part (sequence_metrics) instead of merging every line's summary. Existing sequences get a row
each, marked tracked when all their summaries were.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("entity_state") as batch:
        batch.add_column(sa.Column("drift_state", sa.LargeBinary(), nullable=True))
    metrics = op.create_table(
        "sequence_metrics",
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("tracked", sa.Boolean(), nullable=False),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"]),
        sa.PrimaryKeyConstraint("sequence"),
    )
    op.create_index("ix_sequence_metrics_tracked", "sequence_metrics", ["tracked"])
    summaries = sa.table(
        "batch_summaries",
        sa.column("sequence", sa.Integer()),
        sa.column("batch_id", sa.Integer()),
        sa.column("part", sa.Integer()),
        sa.column("rows", sa.Integer()),
        sa.column("metrics", sa.JSON()),
        sa.column("tracked", sa.Boolean()),
        sa.column("committed_at", sa.DateTime(timezone=True)),
    )
    grouped: dict[int, list] = {}
    for row in op.get_bind().execute(sa.select(summaries)).mappings():
        grouped.setdefault(row["sequence"], []).append(row)
    rows = []
    for sequence, parts in sorted(grouped.items()):
        total = sum(p["rows"] for p in parts)
        merged = {"rows": float(total), "entities": float(len(parts))}
        for key in ("mae_before", "rmse_before"):
            pairs = [(_metrics(p).get(key), p["rows"]) for p in parts]
            pairs = [(v, w) for v, w in pairs if v is not None]
            if pairs:
                merged[key] = sum(v * w for v, w in pairs) / max(sum(w for _, w in pairs), 1)
        rows.append(
            {
                "sequence": sequence,
                "batch_id": parts[0]["batch_id"],
                "part": parts[0]["part"],
                "metrics": merged,
                "tracked": all(p["tracked"] for p in parts),
                "committed_at": max(p["committed_at"] for p in parts),
            }
        )
    if rows:
        op.bulk_insert(metrics, rows)
    with op.batch_alter_table("batch_summaries") as batch:
        batch.drop_column("tracked")


def _metrics(row) -> dict:
    value = row["metrics"]
    return json.loads(value) if isinstance(value, str) else (value or {})


def downgrade() -> None:
    with op.batch_alter_table("batch_summaries") as batch:
        batch.add_column(sa.Column("tracked", sa.Boolean(), nullable=False, server_default=sa.true()))
    op.drop_index("ix_sequence_metrics_tracked", table_name="sequence_metrics")
    op.drop_table("sequence_metrics")
    with op.batch_alter_table("entity_state") as batch:
        batch.drop_column("drift_state")
