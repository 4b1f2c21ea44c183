"""The schema: SQLModel tables shared by PostgreSQL and SQLite.

Migrations in ``migrations/versions`` create and upgrade these tables; a test
checks the two agree. Where the dialects differ (JSONB, timestamptz, partial
indexes), the column type or index says so.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends.

    PostgreSQL stores ``timestamptz``. SQLite has no timestamp type, so values
    are stored as naive UTC text in one fixed format: comparisons in SQL stay
    correct because that format sorts as time does.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: JSON everywhere, JSONB on PostgreSQL (indexable, compact).
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

LIVE_STATES_SQL = "status IN ('leased', 'running')"


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable)


class TaskRow(SQLModel, table=True):
    __tablename__ = "tasks"
    __table_args__ = (
        # Claim path: only ready rows are indexed, so its cost does not grow with finished rows.
        sa.Index(
            "ix_tasks_ready",
            sa.text("priority DESC"),
            "scheduled_at",
            "id",
            postgresql_where=sa.text("status = 'queued'"),
            sqlite_where=sa.text("status = 'queued'"),
        ),
        sa.Index(
            "ix_tasks_live_expiry",
            "lease_expires_at",
            postgresql_where=sa.text(LIVE_STATES_SQL),
            sqlite_where=sa.text(LIVE_STATES_SQL),
        ),
        sa.Index(
            "ix_tasks_dead",
            "tenant",
            "queue",
            "completed_at",
            postgresql_where=sa.text("status = 'dead'"),
            sqlite_where=sa.text("status = 'dead'"),
        ),
        sa.Index(
            "uq_tasks_tenant_idempotency_key",
            "tenant",
            "idempotency_key",
            unique=True,
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
            sqlite_where=sa.text("idempotency_key IS NOT NULL"),
        ),
        sa.Index("ix_tasks_tenant_status_created", "tenant", "status", "created_at"),
        sa.CheckConstraint(
            "status IN ('blocked', 'queued', 'leased', 'running', 'succeeded', 'dead', "
            "'cancelled', 'upstream_failed')",
            name="ck_tasks_status",
        ),
        sa.CheckConstraint("pending_upstreams >= 0", name="ck_tasks_pending_upstreams"),
        sa.CheckConstraint("encoding IN ('json', 'pickle')", name="ck_tasks_encoding"),
    )

    id: uuid.UUID = Field(primary_key=True)
    tenant: str = Field(max_length=200)
    queue: str = Field(max_length=200)
    type: str = Field(max_length=200)
    payload: Any = Field(default=None, sa_type=JSONType, nullable=True)
    status: str = Field(max_length=20)
    priority: int = Field(default=0)
    #: Tries started so far (leases granted); the attempt row of try n has attempt = n.
    attempt: int = Field(default=0)
    max_retries: int = Field(default=3)
    #: Attempts made before the last dead-letter replay; retries are counted from here.
    replayed_attempts: int = Field(default=0)
    backoff_base_s: float = Field(default=1.0)
    backoff_cap_s: float = Field(default=300.0)
    backoff_jitter: float = Field(default=0.5)
    timeout_ms: int | None = Field(default=None, sa_type=sa.BigInteger)
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    scheduled_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    leased_at: datetime | None = _ts()
    started_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()
    lease_id: uuid.UUID | None = Field(default=None)
    lease_expires_at: datetime | None = _ts()
    #: Epoch of the scheduler that granted the current lease (fencing).
    epoch: int | None = Field(default=None, sa_type=sa.BigInteger)
    node_id: str | None = Field(default=None, max_length=200)
    num_cpus: float = Field(default=1.0)
    num_gpus: float = Field(default=0.0)
    memory_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    custom_resources: Any = Field(default=None, sa_type=JSONType, nullable=True)
    #: Upstream tasks not yet succeeded; the task is queued when this reaches 0.
    pending_upstreams: int = Field(default=0)
    idempotency_key: str | None = Field(default=None, max_length=255)
    result: Any = Field(default=None, sa_type=JSONType, nullable=True)
    last_error: str | None = Field(default=None, sa_type=sa.Text)
    labels: Any = Field(default=None, sa_type=JSONType, nullable=True)
    # "metadata" is reserved on declarative classes, so the attribute has another name.
    task_metadata: Any = Field(
        default=None, sa_column=sa.Column("metadata", JSONType, nullable=True)
    )
    #: How payload and result are encoded (models.Encoding): recorded, never guessed.
    encoding: str = Field(
        default="json", max_length=10, sa_column_kwargs={"server_default": "json"}
    )


class TaskEdgeRow(SQLModel, table=True):
    __tablename__ = "task_edges"
    __table_args__ = (sa.Index("ix_task_edges_downstream", "downstream_id"),)

    upstream_id: uuid.UUID = Field(
        sa_column=sa.Column(
            sa.Uuid, sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
        )
    )
    downstream_id: uuid.UUID = Field(
        sa_column=sa.Column(
            sa.Uuid, sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
        )
    )


class TaskAttemptRow(SQLModel, table=True):
    __tablename__ = "task_attempts"

    task_id: uuid.UUID = Field(
        sa_column=sa.Column(
            sa.Uuid, sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
        )
    )
    attempt: int = Field(primary_key=True)
    lease_id: uuid.UUID
    node_id: str | None = Field(default=None, max_length=200)
    worker_id: str | None = Field(default=None, max_length=200)
    leased_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    outcome: str | None = Field(default=None, max_length=20)
    error: str | None = Field(default=None, sa_type=sa.Text)
    traceback: str | None = Field(default=None, sa_type=sa.Text)


class LeaderLeaseRow(SQLModel, table=True):
    """One row per leadership name: who leads, since which epoch, until when."""

    __tablename__ = "leader_leases"

    name: str = Field(primary_key=True, max_length=200)
    holder: str = Field(max_length=200)
    epoch: int = Field(sa_type=sa.BigInteger)
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)


class TaskFunctionRow(SQLModel, table=True):
    """A function shipped by value, stored once per content digest (sha256 of its pickle)."""

    __tablename__ = "task_functions"

    digest: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    blob: bytes = Field(sa_type=sa.LargeBinary)
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False)


class ApiKeyRow(SQLModel, table=True):
    """An API key of one tenant. Only the secret's sha256 is kept: a stolen table does
    not let anyone call the API, and a lost secret cannot be shown again."""

    __tablename__ = "api_keys"

    id: uuid.UUID = Field(primary_key=True)
    tenant: str = Field(max_length=200)
    name: str = Field(max_length=200)
    #: A list of scope names ("submit", "read", "admin").
    scopes: Any = Field(sa_type=JSONType, nullable=False)
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    revoked_at: datetime | None = _ts()


metadata = SQLModel.metadata
tasks: sa.Table = metadata.tables["tasks"]
task_edges: sa.Table = metadata.tables["task_edges"]
task_attempts: sa.Table = metadata.tables["task_attempts"]
leader_leases: sa.Table = metadata.tables["leader_leases"]
task_functions: sa.Table = metadata.tables["task_functions"]
api_keys: sa.Table = metadata.tables["api_keys"]
