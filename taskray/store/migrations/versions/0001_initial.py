"""Tasks, dependency edges, attempts and the leader lease.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from taskray.store.tables import JSONType, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _partial(where: str) -> dict[str, Any]:
    return {"postgresql_where": sa.text(where), "sqlite_where": sa.text(where)}


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("type", sa.String(200), nullable=False),
        sa.Column("payload", JSONType, nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("replayed_attempts", sa.Integer(), nullable=False),
        sa.Column("backoff_base_s", sa.Float(), nullable=False),
        sa.Column("backoff_cap_s", sa.Float(), nullable=False),
        sa.Column("backoff_jitter", sa.Float(), nullable=False),
        sa.Column("timeout_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("scheduled_at", UTCDateTime(), nullable=False),
        sa.Column("leased_at", UTCDateTime(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("lease_id", sa.Uuid(), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=True),
        sa.Column("node_id", sa.String(200), nullable=True),
        sa.Column("num_cpus", sa.Float(), nullable=False),
        sa.Column("num_gpus", sa.Float(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("custom_resources", JSONType, nullable=True),
        sa.Column("pending_upstreams", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("result", JSONType, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("labels", JSONType, nullable=True),
        sa.Column("metadata", JSONType, nullable=True),
        sa.CheckConstraint(
            "status IN ('blocked', 'queued', 'leased', 'running', 'succeeded', 'dead', "
            "'cancelled', 'upstream_failed')",
            name="ck_tasks_status",
        ),
        sa.CheckConstraint("pending_upstreams >= 0", name="ck_tasks_pending_upstreams"),
    )
    op.create_index(
        "ix_tasks_ready",
        "tasks",
        [sa.text("priority DESC"), "scheduled_at", "id"],
        **_partial("status = 'queued'"),
    )
    op.create_index(
        "ix_tasks_live_expiry",
        "tasks",
        ["lease_expires_at"],
        **_partial("status IN ('leased', 'running')"),
    )
    op.create_index(
        "ix_tasks_dead",
        "tasks",
        ["tenant", "queue", "completed_at"],
        **_partial("status = 'dead'"),
    )
    op.create_index(
        "uq_tasks_tenant_idempotency_key",
        "tasks",
        ["tenant", "idempotency_key"],
        unique=True,
        **_partial("idempotency_key IS NOT NULL"),
    )
    op.create_index("ix_tasks_tenant_status_created", "tasks", ["tenant", "status", "created_at"])

    op.create_table(
        "task_edges",
        sa.Column(
            "upstream_id",
            sa.Uuid(),
            sa.ForeignKey("tasks.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "downstream_id",
            sa.Uuid(),
            sa.ForeignKey("tasks.id", ondelete="CASCADE"),
            primary_key=True,
        ),
    )
    op.create_index("ix_task_edges_downstream", "task_edges", ["downstream_id"])

    op.create_table(
        "task_attempts",
        sa.Column(
            "task_id",
            sa.Uuid(),
            sa.ForeignKey("tasks.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("lease_id", sa.Uuid(), nullable=False),
        sa.Column("node_id", sa.String(200), nullable=True),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("leased_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("outcome", sa.String(20), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
    )

    op.create_table(
        "leader_leases",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leader_leases")
    op.drop_table("task_attempts")
    op.drop_index("ix_task_edges_downstream", table_name="task_edges")
    op.drop_table("task_edges")
    for name in (
        "ix_tasks_tenant_status_created",
        "uq_tasks_tenant_idempotency_key",
        "ix_tasks_dead",
        "ix_tasks_live_expiry",
        "ix_tasks_ready",
    ):
        op.drop_index(name, table_name="tasks")
    op.drop_table("tasks")
