"""Each task records how its payload and result are encoded (json or pickle).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECK = "encoding IN ('json', 'pickle')"

# Rows written before this revision carry no encoding. Only a Python client holding the
# database wrote pickled payloads (a one-key object), and the API refused such a payload at
# its top level, so for these rows, and only for them, the shape tells who wrote them.
# From here on the column is written at submit and the shape means nothing.
BACKFILL = {
    "postgresql": (
        "UPDATE tasks SET encoding = 'pickle' WHERE jsonb_typeof(payload) = 'object'"
        " AND jsonb_typeof(payload -> '__taskray_pickle__') = 'string'"
        " AND (SELECT count(*) FROM jsonb_object_keys(payload)) = 1"
    ),
    "sqlite": (
        "UPDATE tasks SET encoding = 'pickle' WHERE json_type(payload) = 'object'"
        " AND json_type(payload, '$.__taskray_pickle__') = 'text'"
        " AND (SELECT count(*) FROM json_each(payload)) = 1"
    ),
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        # SQLite adds a CHECK only inside the column definition (no ALTER ... ADD CONSTRAINT).
        op.add_column(
            "tasks",
            sa.Column(
                "encoding",
                sa.String(10),
                sa.CheckConstraint(CHECK, name="ck_tasks_encoding"),
                nullable=False,
                server_default="json",
            ),
        )
    else:
        op.add_column(
            "tasks", sa.Column("encoding", sa.String(10), nullable=False, server_default="json")
        )
        op.create_check_constraint("ck_tasks_encoding", "tasks", CHECK)
    op.execute(BACKFILL[dialect])


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("encoding")
