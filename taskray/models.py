"""The task record, its states, resource requests and retry rules.

Pure values and validation: nothing here touches a database, Ray or a clock.
"""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from taskray.errors import (
    InvalidPriorityError,
    InvalidResourcesError,
    InvalidTaskError,
    PayloadTooLargeError,
)

#: Priorities run from MIN_PRIORITY (the default, lowest) to MAX_PRIORITY.
MIN_PRIORITY = 0
MAX_PRIORITY = 1000
#: Default upper bound on a payload's JSON size; a store may be configured lower or higher.
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
DEFAULT_QUEUE = "default"
DEFAULT_TENANT = "default"

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-/]{1,200}$")
#: Ray's own resource names; a custom resource must not shadow one of them.
_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class TaskState(enum.StrEnum):
    """Where a task stands. Transitions are listed in ``TRANSITIONS``."""

    BLOCKED = "blocked"  #: waits on upstream tasks
    QUEUED = "queued"  #: ready once scheduled_at has come
    LEASED = "leased"  #: placed on a node, lease granted
    RUNNING = "running"  #: the executor has started it
    SUCCEEDED = "succeeded"
    DEAD = "dead"  #: dead-lettered: retries spent, poison, or a non-retryable error
    CANCELLED = "cancelled"
    UPSTREAM_FAILED = "upstream_failed"  #: an upstream died or was cancelled

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def is_live(self) -> bool:
        """Holds (or is about to hold) a lease."""
        return self in (TaskState.LEASED, TaskState.RUNNING)


TERMINAL_STATES = frozenset(
    {TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED, TaskState.UPSTREAM_FAILED}
)
#: States that make a downstream task fail rather than wait.
FAILED_STATES = frozenset({TaskState.DEAD, TaskState.CANCELLED, TaskState.UPSTREAM_FAILED})

TRANSITIONS: Mapping[TaskState, frozenset[TaskState]] = {
    TaskState.BLOCKED: frozenset(
        {TaskState.QUEUED, TaskState.CANCELLED, TaskState.UPSTREAM_FAILED}
    ),
    TaskState.QUEUED: frozenset({TaskState.LEASED, TaskState.CANCELLED}),
    TaskState.LEASED: frozenset(
        {
            TaskState.RUNNING,
            TaskState.SUCCEEDED,
            TaskState.QUEUED,
            TaskState.DEAD,
            TaskState.CANCELLED,
        }
    ),
    TaskState.RUNNING: frozenset(
        {TaskState.SUCCEEDED, TaskState.QUEUED, TaskState.DEAD, TaskState.CANCELLED}
    ),
    TaskState.SUCCEEDED: frozenset(),
    # Replay puts a dead task back in the queue; its failed downstreams go back to waiting.
    TaskState.DEAD: frozenset({TaskState.QUEUED}),
    TaskState.CANCELLED: frozenset(),
    TaskState.UPSTREAM_FAILED: frozenset({TaskState.BLOCKED}),
}


class Encoding(enum.StrEnum):
    """How a task's payload and its result are stored in their JSON columns. Recorded at
    submit, never guessed from a value's shape: a JSON value is never unpickled, whatever
    keys it holds."""

    JSON = "json"  #: plain JSON, from any client
    #: cloudpickle, base64 in a one-key JSON object: from a trusted Python client (one that
    #: holds the database); the executor pickles such a task's result too.
    PICKLE = "pickle"


class AttemptOutcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  #: the handler raised
    LEASE_EXPIRED = "lease_expired"  #: the holder stopped heartbeating (crash, lost node)
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Resources:
    """What one task needs on a node, in Ray's units.

    ``memory`` is in bytes; ``custom`` maps a custom resource name to an amount.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int = 0
    custom: Mapping[str, float] = field(default_factory=dict)

    def validate(self) -> Resources:
        for name, value in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus)):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise InvalidResourcesError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise InvalidResourcesError(f"{name} must be a finite number >= 0, got {value}")
        # Ray accepts a fraction of one GPU, or whole GPUs, never 1.5.
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise InvalidResourcesError(
                f"num_gpus above 1 must be a whole number, got {self.num_gpus}"
            )
        if not isinstance(self.memory, int) or isinstance(self.memory, bool) or self.memory < 0:
            raise InvalidResourcesError(
                f"memory must be a whole number of bytes >= 0, got {self.memory!r}"
            )
        for name, amount in self.custom.items():
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise InvalidResourcesError(f"invalid custom resource name {name!r}")
            if name in _BUILTIN_RESOURCES:
                raise InvalidResourcesError(
                    f"{name!r} is a built-in resource; use num_cpus, num_gpus or memory"
                )
            if (
                not isinstance(amount, int | float)
                or isinstance(amount, bool)
                or not math.isfinite(amount)
                or amount <= 0
            ):
                raise InvalidResourcesError(
                    f"custom resource {name!r} must be a finite number > 0, got {amount!r}"
                )
        return self

    def as_dict(self) -> dict[str, float]:
        """The request as one flat vector in Ray's resource names (zeros left out)."""
        vector: dict[str, float] = {}
        if self.num_cpus:
            vector["CPU"] = float(self.num_cpus)
        if self.num_gpus:
            vector["GPU"] = float(self.num_gpus)
        if self.memory:
            vector["memory"] = float(self.memory)
        vector.update({k: float(v) for k, v in self.custom.items()})
        return vector


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how soon a failed task is tried again.

    The delay before retry n (1-based) is ``min(cap, base * 2**(n-1))``, of which
    a share ``jitter`` is drawn at random so that tasks failing together do not
    come back together.
    """

    max_retries: int = 3
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    jitter: float = 0.5

    def validate(self) -> RetryPolicy:
        if not isinstance(self.max_retries, int) or not 0 <= self.max_retries <= 1000:
            raise InvalidTaskError(
                f"max_retries must be an integer in 0..1000, got {self.max_retries!r}"
            )
        for name, value in (
            ("backoff_base_s", self.backoff_base_s),
            ("backoff_cap_s", self.backoff_cap_s),
        ):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InvalidTaskError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.backoff_cap_s < self.backoff_base_s:
            raise InvalidTaskError("backoff_cap_s must not be below backoff_base_s")
        if not 0 <= self.jitter <= 1:
            raise InvalidTaskError(f"jitter must be within 0..1, got {self.jitter!r}")
        return self

    def backoff_s(self, retry_number: int, unit_random: float) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based); ``unit_random`` in [0, 1)."""
        # 2.0**1023 is the largest power of two a float holds; past it the cap rules anyway.
        exponent = min(retry_number - 1, 1023)
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * (2.0**exponent))
        return ceiling * (1.0 - self.jitter) + ceiling * self.jitter * unit_random

    def decide(self, attempts_made: int, retryable: bool, unit_random: float) -> RetryDecision:
        """After ``attempts_made`` tries of which the last failed: retry, or dead-letter."""
        if not retryable:
            return DeadLetter("non-retryable error")
        if attempts_made > self.max_retries:
            return DeadLetter(f"retries exhausted after {attempts_made} attempts")
        return RetryAfter(self.backoff_s(attempts_made, unit_random))


@dataclass(frozen=True, slots=True)
class RetryAfter:
    delay_s: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


RetryDecision = RetryAfter | DeadLetter


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task as submitted.

    ``depends_on`` names upstream tasks: ids of stored tasks, or the ``key`` of
    another spec in the same batch (client-side names for DAG batches).
    """

    type: str
    payload: Any = None
    queue: str = DEFAULT_QUEUE
    tenant: str = DEFAULT_TENANT
    priority: int = MIN_PRIORITY
    delay_s: float = 0.0
    scheduled_at: datetime | None = None
    timeout_s: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    resources: Resources = field(default_factory=Resources)
    depends_on: Sequence[uuid.UUID | str] = ()
    idempotency_key: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: Client-side name, unique within one batch, that other specs of the batch may depend on.
    key: str | None = None
    #: Optional id chosen by the client (e.g. so a retried request names the same task).
    id: uuid.UUID | None = None
    #: How ``payload`` is encoded (and the result will be).
    encoding: Encoding = Encoding.JSON

    def validate(self, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> int:
        """Check every field; returns the payload's encoded size in bytes."""
        if not isinstance(self.type, str) or not _NAME_RE.match(self.type):
            raise InvalidTaskError(
                "task type must be 1-200 characters of letters, digits and _.:-/, "
                f"got {self.type!r}"
            )
        if not isinstance(self.encoding, Encoding):
            raise InvalidTaskError(f"encoding must be an Encoding, got {self.encoding!r}")
        for name, value in (("queue", self.queue), ("tenant", self.tenant)):
            if not isinstance(value, str) or not _NAME_RE.match(value):
                raise InvalidTaskError(f"invalid {name} {value!r}")
        if (
            not isinstance(self.priority, int)
            or isinstance(self.priority, bool)
            or not MIN_PRIORITY <= self.priority <= MAX_PRIORITY
        ):
            raise InvalidPriorityError(
                f"priority must be an integer in {MIN_PRIORITY}..{MAX_PRIORITY}, "
                f"got {self.priority!r}"
            )
        if (
            not isinstance(self.delay_s, int | float)
            or not math.isfinite(self.delay_s)
            or self.delay_s < 0
        ):
            raise InvalidTaskError(
                f"delay must be a finite number of seconds >= 0, got {self.delay_s!r}"
            )
        if self.scheduled_at is not None and self.scheduled_at.tzinfo is None:
            raise InvalidTaskError("scheduled_at must carry a timezone")
        if self.timeout_s is not None and (
            not isinstance(self.timeout_s, int | float)
            or not math.isfinite(self.timeout_s)
            or self.timeout_s <= 0
        ):
            raise InvalidTaskError(
                f"timeout must be a positive number of seconds, got {self.timeout_s!r}"
            )
        self.retry.validate()
        self.resources.validate()
        if self.idempotency_key is not None and (
            not isinstance(self.idempotency_key, str) or not 1 <= len(self.idempotency_key) <= 255
        ):
            raise InvalidTaskError("idempotency_key must be a string of 1-255 characters")
        for k, v in self.labels.items():
            if (
                not isinstance(k, str)
                or not _NAME_RE.match(k)
                or not isinstance(v, str)
                or len(v) > 200
            ):
                raise InvalidTaskError(f"invalid label {k!r}={v!r}")
        try:
            size = len(json.dumps(self.payload, separators=(",", ":"), allow_nan=False))
            json.dumps(dict(self.metadata), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidTaskError(
                f"payload and metadata must be JSON-serialisable: {exc}"
            ) from None
        if size > max_payload_bytes:
            raise PayloadTooLargeError(
                f"payload is {size} bytes; the limit is {max_payload_bytes}",
                size=size,
                limit=max_payload_bytes,
            )
        return size


@dataclass(frozen=True, slots=True)
class Task:
    """One stored task as read back from the store."""

    id: uuid.UUID
    tenant: str
    queue: str
    type: str
    payload: Any
    status: TaskState
    priority: int
    attempt: int
    retry: RetryPolicy
    timeout_s: float | None
    resources: Resources
    created_at: datetime
    scheduled_at: datetime
    leased_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    lease_id: uuid.UUID | None
    lease_expires_at: datetime | None
    epoch: int | None
    node_id: str | None
    pending_upstreams: int
    idempotency_key: str | None
    result: Any
    last_error: str | None
    labels: Mapping[str, str]
    metadata: Mapping[str, Any]
    #: How ``payload`` and ``result`` are encoded.
    encoding: Encoding = Encoding.JSON

    @property
    def max_retries(self) -> int:
        return self.retry.max_retries


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of a task: the audit trail."""

    task_id: uuid.UUID
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


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """What submit said about one spec: the stored task, and whether it was a repeat."""

    task: Task
    deduplicated: bool


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease granted on one task."""

    task: Task
    lease_id: uuid.UUID
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """The scheduler's choice: this task, on this node."""

    task_id: uuid.UUID
    node_id: str | None = None


@dataclass(frozen=True, slots=True)
class ReadyTask:
    """A ready task as the scheduler reads it: what placement needs, never its payload
    (a pass reads a window of these, so its cost does not grow with payload sizes)."""

    id: uuid.UUID
    type: str
    priority: int
    scheduled_at: datetime
    timeout_s: float | None
    resources: Resources
    labels: Mapping[str, str]
    metadata: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Grant:
    """One lease granted by ``Store.lease_many``: the task, its new lease and its node."""

    task_id: uuid.UUID
    lease_id: uuid.UUID
    node_id: str | None
    attempt: int


@dataclass(frozen=True, slots=True)
class Success:
    """An executor's report that a task returned ``result`` (committed by ``complete_many``)."""

    task_id: uuid.UUID
    lease_id: uuid.UUID
    result: Any
    #: When the handler began and ended, by the database clock (a lane's start time plus
    #: the time since, on the executor): tasks of a lane are all marked running when the
    #: lane starts, and run one after another, so the attempt records the real times.
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """An executor's (or the scheduler's) report that an attempt failed."""

    task_id: uuid.UUID
    lease_id: uuid.UUID
    error: str
    traceback: str | None = None
    retryable: bool = True
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class BatchCommit:
    """What a batched transition did, row by row: the fence is per row, so a batch with
    some stale leases commits the rest and refuses (and names) those."""

    committed: list[uuid.UUID]
    #: Tasks whose lease was gone (expired, reaped, cancelled): nothing was written for them.
    refused: list[uuid.UUID]


@dataclass(frozen=True, slots=True)
class StartedBatch:
    """What ``Store.start_many`` did: the tasks now running (in the order asked), and
    those whose lease was gone (nothing was written for them)."""

    tasks: list[Task]
    refused: list[uuid.UUID]
    #: The database time the tasks were marked running.
    at: datetime | None = None


def check_result_size(result: Any, limit: int) -> None:
    """Refuse a result that is not JSON, or larger than ``limit`` bytes as JSON."""
    try:
        size = len(json.dumps(result, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidTaskError(f"value must be JSON-serialisable: {exc}") from None
    if size > limit:
        raise PayloadTooLargeError(
            f"result is {size} bytes; the limit is {limit}", size=size, limit=limit
        )
