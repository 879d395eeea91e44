"""Paths relative to the work folder, and the record of live-model recoveries.

Paths inside the work folder were stored absolute, so a copied folder's runs read, and deleted,
the original's checkpoints. They are rewritten relative to the folder they were written in: the
folder that holds the default folders (checkpoints/, output/, archive/, quarantine/, landing/) in
most of the stored paths. Paths outside it (a landing folder configured elsewhere) stay
absolute, as do paths under folders renamed in the config (they keep working, unrelocatable).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections import Counter
from pathlib import PurePosixPath

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FOLDERS = ("checkpoints", "output", "archive", "quarantine", "landing")
# (table, column) of every stored path
PATH_COLUMNS = (
    ("model_state", "checkpoint_path"),
    ("batches", "source_file"),
    ("batches", "stored_at"),
    ("batches", "output_path"),
    ("arrivals", "path"),
    ("batch_summaries", "features_path"),
)


def _work_folder(paths: list[str]) -> str | None:
    """The folder most stored paths lie in, as the parent of one of the default folders."""
    roots: Counter[str] = Counter()
    for path in paths:
        parts = PurePosixPath(path).parts
        inside = [i for i, part in enumerate(parts[:-1]) if part in FOLDERS and i > 0]
        if inside:
            roots[str(PurePosixPath(*parts[: inside[-1]]))] += 1
    return roots.most_common(1)[0][0] if roots else None


def upgrade() -> None:
    op.create_table(
        "model_recoveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.String(length=200), nullable=False),
        sa.Column("missing_checkpoint", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("restored_version", sa.String(length=50), nullable=False),
        sa.Column("restored_kind", sa.String(length=30), nullable=True),
        sa.Column("checkpoint_path", sa.Text(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("trigger", sa.String(length=30), nullable=False),
        sa.Column("recovered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    bind = op.get_bind()
    state = sa.table("model_state", sa.column("checkpoint_path", sa.Text()))
    checkpoints = [p for (p,) in bind.execute(sa.select(state.c.checkpoint_path)) if p]
    root = _work_folder([p for p in checkpoints if p.startswith("/")])
    if root is None:  # no live model yet: the landed files tell
        stored = []
        for name, column in PATH_COLUMNS[1:]:
            c = sa.table(name, sa.column(column, sa.Text())).c[column]
            stored += [p for (p,) in bind.execute(sa.select(c).where(c.like("/%")).limit(1000)) if p]
        root = _work_folder(stored)
    if root is None:
        return
    prefix = root.rstrip("/") + "/"
    for name, column in PATH_COLUMNS:
        table = sa.table(name, sa.column(column, sa.Text()))
        c = table.c[column]
        relative = sa.func.substr(c, len(prefix) + 1)
        bind.execute(sa.update(table).where(c.startswith(prefix, autoescape=True)).values({column: relative}))


def downgrade() -> None:
    # Relative paths stay relative: the folder they were made relative to is not known here,
    # and a revision-0002 reader resolves them against its working directory.
    op.drop_table("model_recoveries")
