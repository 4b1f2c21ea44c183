"""Request and response bodies: one model per direction (``...Create`` in, ``...Public`` out)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, field_validator

from taskray import serialization
from taskray.models import (
    DEFAULT_QUEUE,
    MAX_PRIORITY,
    MIN_PRIORITY,
    Attempt,
    AttemptOutcome,
    Encoding,
    Resources,
    RetryPolicy,
    Task,
    TaskSpec,
    TaskState,
)
from taskray.store import QueueStats

Name = Annotated[str, Field(min_length=1, max_length=200)]
#: Bounds that keep every number inside what both databases and datetime arithmetic hold.
DAY_S = 86_400.0


class ResourcesCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=1.0, ge=0, le=1e6)
    num_gpus: float = Field(default=0.0, ge=0, le=1e4)
    #: Bytes.
    memory: int = Field(default=0, ge=0, le=1 << 60)
    custom: dict[Name, Annotated[float, Field(gt=0, le=1e12)]] = Field(default_factory=dict)


class BackoffCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_s: float = Field(default=1.0, ge=0, le=DAY_S)
    cap_s: float = Field(default=300.0, ge=0, le=7 * DAY_S)
    jitter: float = Field(default=0.5, ge=0, le=1)


_TASK_EXAMPLE: dict[str, Any] = {
    "type": "reports.tasks:render",
    "payload": {"report_id": 42},
    "queue": "reports",
    "priority": 10,
    "delay_s": 0,
    "timeout_s": 600,
    "max_retries": 3,
    "backoff": {"base_s": 1, "cap_s": 300, "jitter": 0.5},
    "resources": {"num_cpus": 2, "num_gpus": 0, "memory": 1073741824},
    "labels": {"team": "analytics"},
    "metadata": {"requested_by": "ana"},
    "idempotency_key": "report-42-2026-12-05",
}


class TaskCreate(BaseModel):
    """A task to submit. ``depends_on`` names stored task ids or, in a batch, the ``key`` of
    another task of the same batch."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_TASK_EXAMPLE]})

    type: Name = Field(
        description="A registered task type: `module:function` of a function marked "
        "`@taskray.task` in one of the deployment's task modules; any other is refused (422)."
    )
    payload: JsonValue = None
    queue: Name = DEFAULT_QUEUE
    priority: int = Field(default=MIN_PRIORITY, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    scheduled_at: AwareDatetime | None = None
    delay_s: float = Field(default=0.0, ge=0, le=366 * DAY_S)
    timeout_s: float | None = Field(default=None, gt=0, le=30 * DAY_S)
    max_retries: int = Field(default=3, ge=0, le=1000)
    backoff: BackoffCreate = Field(default_factory=BackoffCreate)
    resources: ResourcesCreate = Field(default_factory=ResourcesCreate)
    depends_on: list[Name] = Field(default_factory=list, max_length=10_000)
    labels: dict[Name, Annotated[str, Field(max_length=200)]] = Field(default_factory=dict)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    #: Client-side name of this task within a batch.
    key: Name | None = None

    @field_validator("type")
    @classmethod
    def _not_shipped_by_value(cls, value: str) -> str:
        # Functions shipped by value are the Python SDK's, run from its own pickles.
        if value.startswith(serialization.PICKLED_TYPE_PREFIX):
            raise ValueError("task types shipped by value cannot be submitted over HTTP")
        return value

    @field_validator("scheduled_at")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("scheduled_at is out of range") from None

    def to_spec(self, tenant: str, idempotency_key: str | None = None) -> TaskSpec:
        return TaskSpec(
            type=self.type,
            payload=self.payload,
            queue=self.queue,
            tenant=tenant,
            priority=self.priority,
            delay_s=self.delay_s,
            scheduled_at=self.scheduled_at,
            timeout_s=self.timeout_s,
            retry=RetryPolicy(
                max_retries=self.max_retries,
                backoff_base_s=self.backoff.base_s,
                backoff_cap_s=self.backoff.cap_s,
                jitter=self.backoff.jitter,
            ),
            resources=Resources(
                num_cpus=self.resources.num_cpus,
                num_gpus=self.resources.num_gpus,
                memory=self.resources.memory,
                custom=dict(self.resources.custom),
            ),
            depends_on=list(self.depends_on),
            idempotency_key=idempotency_key or self.idempotency_key,
            labels=dict(self.labels),
            metadata=dict(self.metadata),
            key=self.key,
            # Over HTTP a payload is JSON, whatever its shape; it is never unpickled.
            encoding=Encoding.JSON,
        )


class TaskBatchCreate(BaseModel):
    """Tasks stored in one transaction, all or none; a DAG names its edges by ``key``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "tasks": [
                        {
                            "key": "extract",
                            "type": "etl.tasks:extract",
                            "payload": {"day": "12-05"},
                        },
                        {"key": "load", "type": "etl.tasks:load", "depends_on": ["extract"]},
                    ]
                }
            ]
        },
    )

    tasks: list[TaskCreate] = Field(min_length=1, max_length=10_000)


class ResourcesPublic(BaseModel):
    num_cpus: float
    num_gpus: float
    memory: int
    custom: dict[str, float]


class AttemptPublic(BaseModel):
    attempt: int
    lease_id: uuid.UUID
    node_id: str | None
    worker_id: str | None
    leased_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    outcome: AttemptOutcome | None
    error: str | None
    traceback: str | None

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptPublic:
        return cls(
            attempt=attempt.attempt,
            lease_id=attempt.lease_id,
            node_id=attempt.node_id,
            worker_id=attempt.worker_id,
            leased_at=attempt.leased_at,
            started_at=attempt.started_at,
            finished_at=attempt.finished_at,
            outcome=attempt.outcome,
            error=attempt.error,
            traceback=attempt.traceback,
        )


class TaskPublic(BaseModel):
    id: uuid.UUID
    type: str
    queue: str
    status: TaskState
    priority: int
    attempt: int
    max_retries: int
    timeout_s: float | None
    resources: ResourcesPublic
    payload: JsonValue
    result: JsonValue
    last_error: str | None
    node_id: str | None
    created_at: datetime
    scheduled_at: datetime
    leased_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    lease_expires_at: datetime | None
    pending_upstreams: int
    idempotency_key: str | None
    labels: dict[str, str]
    metadata: dict[str, JsonValue]
    #: "json", or "pickle": payload and result are Python pickles from a trusted Python
    #: client (base64 under "__taskray_pickle__"), for that client to read.
    encoding: Encoding

    @classmethod
    def fields_of(cls, task: Task) -> dict[str, Any]:
        return {
            "id": task.id,
            "type": task.type,
            "queue": task.queue,
            "status": task.status,
            "priority": task.priority,
            "attempt": task.attempt,
            "max_retries": task.max_retries,
            "timeout_s": task.timeout_s,
            "resources": ResourcesPublic(
                num_cpus=task.resources.num_cpus,
                num_gpus=task.resources.num_gpus,
                memory=task.resources.memory,
                custom=dict(task.resources.custom),
            ),
            "payload": task.payload,
            "result": task.result,
            "last_error": task.last_error,
            "node_id": task.node_id,
            "created_at": task.created_at,
            "scheduled_at": task.scheduled_at,
            "leased_at": task.leased_at,
            "started_at": task.started_at,
            "completed_at": task.completed_at,
            "lease_expires_at": task.lease_expires_at,
            "pending_upstreams": task.pending_upstreams,
            "idempotency_key": task.idempotency_key,
            "labels": dict(task.labels),
            "metadata": dict(task.metadata),
            "encoding": task.encoding,
        }

    @classmethod
    def of(cls, task: Task) -> TaskPublic:
        return cls(**cls.fields_of(task))


class TaskSubmitted(TaskPublic):
    #: True when the idempotency key was used before: this is the first task, unchanged.
    deduplicated: bool


class TaskDetail(TaskPublic):
    attempts: list[AttemptPublic]


class BatchSubmitted(BaseModel):
    tasks: list[TaskSubmitted]
    #: Task id of each client-side key of the batch.
    keys: dict[str, uuid.UUID]
    created: int
    deduplicated: int


class TaskPage(BaseModel):
    tasks: list[TaskPublic]
    #: Pass as ``cursor`` for the next page; null on the last page.
    next_cursor: str | None


#: Most task ids one wait request may name.
MAX_WAIT_IDS = 10_000
#: Longest a wait request may be held, in seconds.
MAX_WAIT_S = 60.0


class TaskWait(BaseModel):
    """Wait for tasks to finish (long poll): answered once ``num_returns`` of ``ids`` are
    terminal (succeeded, dead, cancelled, upstream_failed), or when ``timeout`` runs out,
    whichever comes first."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "ids": ["0b7e4f4e-8a8e-4bd0-9a54-0c0f5b0a9e11"],
                    "num_returns": 1,
                    "timeout": 10,
                }
            ]
        },
    )

    ids: list[uuid.UUID] = Field(
        min_length=1, max_length=MAX_WAIT_IDS, description="Task ids; a repeat counts once."
    )
    num_returns: int | None = Field(
        default=None,
        ge=0,
        le=MAX_WAIT_IDS,
        description="How many must be terminal before the answer; default: all of them.",
    )
    timeout: float = Field(
        default=10.0,
        ge=0,
        le=MAX_WAIT_S,
        allow_inf_nan=False,
        description="Seconds to wait at most; 0 reads once and answers at once.",
    )


class TasksFinished(BaseModel):
    tasks: list[TaskPublic] = Field(
        description="The terminal tasks among those asked, in the order asked (each once)."
    )
    pending: int = Field(description="How many of the distinct ids asked are not terminal yet.")


class DeadLetterReplay(BaseModel):
    """Replay every dead task of the caller's tenant matching these filters."""

    model_config = ConfigDict(extra="forbid")

    queue: Name | None = None
    type: Name | None = None


class DeadLetterPurge(BaseModel):
    """Delete dead tasks: those named, or every one matching the filters."""

    model_config = ConfigDict(extra="forbid")

    task_ids: list[uuid.UUID] | None = Field(default=None, max_length=10_000)
    queue: Name | None = None
    type: Name | None = None
    older_than: AwareDatetime | None = None


class Replayed(BaseModel):
    replayed: int
    task_ids: list[uuid.UUID]


class Purged(BaseModel):
    purged: int


class DepthPublic(BaseModel):
    status: TaskState
    priority: int
    count: int


class QueueStatsPublic(BaseModel):
    queue: str
    by_state: dict[str, int]
    depth: list[DepthPublic]
    oldest_ready_age_s: float | None
    finished_in_window: dict[str, int]
    window_s: float

    @classmethod
    def of(cls, stats: QueueStats) -> QueueStatsPublic:
        return cls(
            queue=stats.queue,
            by_state=stats.by_state,
            depth=[
                DepthPublic(status=TaskState(s), priority=p, count=n)
                for s, p, n in stats.by_state_priority
            ],
            oldest_ready_age_s=stats.oldest_ready_age_s,
            finished_in_window=stats.finished_in_window,
            window_s=stats.window_s,
        )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    #: Each check's outcome: "ok" or the reason it failed.
    checks: dict[str, str]
