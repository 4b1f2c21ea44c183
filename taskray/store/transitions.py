"""A task's life after its lease: heartbeat, complete, fail (retry or dead-letter),
cancel, the reaping of expired leases, and what each does downstream (start, one task or
many, is in ``hot_path``).

The executor's writes (heartbeat, complete, fail) go through ``_fenced``: they hold
a lease and commit only while it is the task's live one. Cancel and the reaper hold no
lease; they move a row they read out of exactly the state it was in (``_transition``).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from taskray.errors import InvalidStateError, LeaseLostError, PayloadTooLargeError
from taskray.models import AttemptOutcome, DeadLetter, RetryPolicy, Task, TaskState
from taskray.store.base import (
    LIVE,
    StoreBase,
    TransactionalWrite,
    _as_uuid,
    _json_size,
    _task,
)
from taskray.store.tables import task_edges, tasks


class TransitionsMixin(StoreBase):
    def heartbeat(
        self, task_id: uuid.UUID | str, lease_id: uuid.UUID, *, ttl_s: float | None = None
    ) -> datetime:
        """Extend the lease and return its new expiry; ``LeaseLostError`` when it is gone."""
        task_uuid = _as_uuid(task_id)
        with self.transaction() as (connection, now):
            expires = now + timedelta(seconds=self.lease_ttl_s if ttl_s is None else ttl_s)
            # Only the id comes back: a heartbeat never ships the payload or the result.
            self._fenced(
                connection,
                now,
                task_uuid,
                lease_id,
                {"lease_expires_at": expires},
                columns=(tasks.c.id,),
            )
            return expires

    def complete(
        self,
        task_id: uuid.UUID | str,
        lease_id: uuid.UUID,
        result: Any = None,
        *,
        write: TransactionalWrite | None = None,
    ) -> Task:
        """Commit the task's result, exactly once, for the holder of the live lease.

        In the same transaction: the attempt is recorded, downstream tasks whose upstreams
        have now all succeeded are released, and ``write(connection)`` runs so a handler's
        own rows commit (or roll back) with the result.

        Idempotent for the lease holder: if the result was already committed under
        ``lease_id`` (a retry whose first try committed, its reply lost), the task is
        returned as it is, and neither the result nor ``write`` is written again.
        """
        size = _json_size(result)
        if size > self.max_payload_bytes:
            raise PayloadTooLargeError(
                f"result is {size} bytes; the limit is {self.max_payload_bytes}",
                size=size,
                limit=self.max_payload_bytes,
            )
        task_uuid = _as_uuid(task_id)
        with self.transaction() as (connection, now):
            self._durable(connection)
            try:
                row = self._fenced(
                    connection,
                    now,
                    task_uuid,
                    lease_id,
                    {
                        "status": TaskState.SUCCEEDED.value,
                        "result": result,
                        "completed_at": now,
                        "lease_expires_at": None,
                        "last_error": None,
                    },
                )
            except LeaseLostError:
                done = self._already(connection, [(task_uuid, lease_id)], TaskState.SUCCEEDED, now)
                if not done:
                    raise
                return _task(done[task_uuid])
            self._finish_attempt(connection, row, now, AttemptOutcome.SUCCEEDED)
            self._release_downstream(connection, task_uuid)
            self._notify_done(connection)
            if write is not None:
                write(connection)
            return _task(row)

    def fail(
        self,
        task_id: uuid.UUID | str,
        lease_id: uuid.UUID,
        error: str,
        *,
        traceback: str | None = None,
        retryable: bool = True,
    ) -> Task:
        """Record a failed attempt: back to ``queued`` after a backoff, or ``dead``.

        A non-retryable error, or a failure once ``max_retries`` retries are spent,
        dead-letters the task, and its downstream tasks become ``upstream_failed``.
        """
        task_uuid = _as_uuid(task_id)
        with self.transaction() as (connection, now):
            # The retry decision needs the row: read it under the fence, then move it.
            row = self._fenced(connection, now, task_uuid, lease_id, None)
            self._finish_attempt(connection, row, now, AttemptOutcome.FAILED, error, traceback)
            failed = _task(self._after_failure(connection, row, now, error, retryable))
            if failed.status is TaskState.DEAD:
                self._notify_done(connection)
            return failed

    def cancel(
        self, task_id: uuid.UUID | str, *, tenant: str | None = None, reason: str = "cancelled"
    ) -> Task:
        """Cancel a task that has not finished. A leased or running task loses its lease, so
        its executor's next heartbeat or commit is refused; its downstream tasks fail."""
        task_uuid = _as_uuid(task_id)
        with self.transaction() as (connection, now):
            self._durable(connection)
            row = self._one(connection, task_uuid, tenant, lock=True)
            state = TaskState(row["status"])
            if state.is_terminal:
                raise InvalidStateError(
                    f"task {task_uuid} is already {state.value}",
                    task_id=str(task_uuid),
                    status=state.value,
                )
            if state.is_live:
                self._finish_attempt(connection, row, now, AttemptOutcome.CANCELLED, reason)
            changed = self._transition(
                connection,
                row,
                {
                    "status": TaskState.CANCELLED.value,
                    "completed_at": now,
                    "lease_id": None,
                    "lease_expires_at": None,
                    "last_error": reason,
                },
            )
            self._fail_downstream(connection, task_uuid, now)
            self._notify_done(connection)
            return _task(changed)

    def reap(self, limit: int = 1000) -> list[Task]:
        """Expired leases: each a failed attempt, back to ``queued`` or ``dead``."""
        with self.transaction() as (connection, now):
            query = (
                sa.select(tasks)
                .where(tasks.c.status.in_(LIVE), tasks.c.lease_expires_at <= now)
                .order_by(tasks.c.lease_expires_at)
                .limit(limit)
            )
            rows = list(connection.execute(self._lock(query, skip_locked=True)).mappings())
            reaped = []
            for row in rows:
                error = f"lease expired on node {row['node_id'] or 'unknown'}"
                self._finish_attempt(connection, row, now, AttemptOutcome.LEASE_EXPIRED, error)
                reaped.append(_task(self._after_failure(connection, row, now, error, True)))
            if any(t.status is TaskState.DEAD for t in reaped):
                self._notify_done(connection)
            return reaped

    # -- what follows a failure, and downstream ---------------------------------------------

    def _after_failure(
        self, connection: Connection, row: RowMapping, now: datetime, error: str, retryable: bool
    ) -> RowMapping:
        policy = RetryPolicy(
            max_retries=row["max_retries"],
            backoff_base_s=row["backoff_base_s"],
            backoff_cap_s=row["backoff_cap_s"],
            jitter=row["backoff_jitter"],
        )
        decision = policy.decide(
            row["attempt"] - row["replayed_attempts"], retryable, self.rng.random()
        )
        if isinstance(decision, DeadLetter):
            changed = self._transition(
                connection,
                row,
                {
                    "status": TaskState.DEAD.value,
                    "completed_at": now,
                    "lease_id": None,
                    "lease_expires_at": None,
                    "last_error": f"{error} ({decision.reason})",
                },
            )
            self._fail_downstream(connection, row["id"], now)
            return changed
        return self._transition(
            connection,
            row,
            {
                "status": TaskState.QUEUED.value,
                "scheduled_at": now + timedelta(seconds=decision.delay_s),
                "lease_id": None,
                "lease_expires_at": None,
                "last_error": error,
            },
        )

    def _fail_downstream(self, connection: Connection, task_id: uuid.UUID, now: datetime) -> None:
        """Every task downstream of a failed one, transitively, becomes ``upstream_failed``.

        Its callers (a dead-letter, a cancel) notify ``DONE_CHANNEL`` for the transaction,
        so the tasks finished here are announced with the one that failed.
        """
        edges = task_edges.alias("e")
        seed = sa.select(task_edges.c.downstream_id.label("id")).where(
            task_edges.c.upstream_id == task_id
        )
        closure = seed.cte("downstream", recursive=True)
        closure = closure.union(
            sa.select(edges.c.downstream_id).join(closure, edges.c.upstream_id == closure.c.id)
        )
        connection.execute(
            sa.update(tasks)
            .where(
                tasks.c.id.in_(sa.select(closure.c.id)),
                tasks.c.status == TaskState.BLOCKED.value,
            )
            .values(
                status=TaskState.UPSTREAM_FAILED.value,
                completed_at=now,
                last_error=f"upstream failed: {task_id}",
            )
        )

    def _release_downstream(self, connection: Connection, task_id: uuid.UUID) -> None:
        downstream = sa.select(task_edges.c.downstream_id).where(
            task_edges.c.upstream_id == task_id
        )
        released = connection.execute(
            sa.update(tasks)
            .where(tasks.c.id.in_(downstream), tasks.c.status == TaskState.BLOCKED.value)
            .values(
                # Both expressions read the row as it was before this UPDATE.
                pending_upstreams=tasks.c.pending_upstreams - 1,
                status=sa.case(
                    (tasks.c.pending_upstreams == 1, TaskState.QUEUED.value),
                    else_=tasks.c.status,
                ),
            )
        )
        if released.rowcount:
            self._notify_work(connection)
