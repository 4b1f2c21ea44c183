"""The path every task takes, batched: read ready work, lease it, start, keep alive, commit.

Each operation here moves many tasks in one transaction and (on PostgreSQL) in one
or two statements, however many tasks there are: rows travel as arrays
(``unnest``), the time is the database's own ``now()`` inside the statements (no
separate round trip), and no row is read before it is written. The fence stays
per row: a batch in which some leases are stale commits the rest, and names the
refused ones (``BatchCommit.refused``), never applying them.

SQLite runs the same operations row by row inside one transaction: it is one
process's file, every transaction already holds its single write lock, and a
statement costs microseconds there.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from taskray.errors import LeaseLostError, NotLeaderError
from taskray.models import (
    AttemptOutcome,
    BatchCommit,
    Failure,
    Grant,
    ReadyTask,
    Resources,
    StartedBatch,
    Success,
    Task,
    TaskState,
    check_result_size,
)
from taskray.store.base import (
    DEFAULT_LEADER_NAME,
    LIVE,
    _as_uuid,
    _task,
)
from taskray.store.leasing import LeasingMixin
from taskray.store.tables import task_attempts, task_edges, tasks
from taskray.store.transitions import TransitionsMixin

#: What a scheduler pass reads of a ready task: no payload, no result.
_READY_COLUMNS = (
    tasks.c.id,
    tasks.c.type,
    tasks.c.priority,
    tasks.c.scheduled_at,
    tasks.c.timeout_ms,
    tasks.c.num_cpus,
    tasks.c.num_gpus,
    tasks.c.memory_bytes,
    tasks.c.custom_resources,
    tasks.c.labels,
    tasks.c.metadata,
)
_LIVE_SQL = "('leased', 'running')"
_TIME = tasks.c.started_at.type


def _ids(values: Iterable[uuid.UUID]) -> list[str]:
    return [str(v) for v in values]


class HotPathMixin(LeasingMixin, TransitionsMixin):
    """Batched operations of the scheduler and the executors."""

    def check_result(self, result: Any) -> None:
        """Raise what ``complete`` would for this result (not JSON, too large), so an
        executor can dead-letter it before it joins a group commit."""
        check_result_size(result, self.max_payload_bytes)

    def _sql_now(self, connection: Connection) -> tuple[sa.ColumnElement[Any], datetime | None]:
        """The transaction's time as SQL: PostgreSQL's ``now()`` when the database clock is
        in use (it is the transaction's start, as ``SELECT now()`` would say, without the
        round trip), else the injected clock's reading as a parameter."""
        if self.sql_clock:
            return sa.func.now(), None
        now = self.clock.now(connection)
        return sa.literal(now, type_=tasks.c.scheduled_at.type), now

    # -- reading ready work -----------------------------------------------------------------

    def ready(self, limit: int, *, queues: Sequence[str] | None = None) -> list[ReadyTask]:
        """Up to ``limit`` ready tasks, highest priority first, then oldest; without their
        payloads. An index range scan (``ix_tasks_ready``): its cost does not grow with
        the number of queued or finished tasks."""
        with self.read_connection() as connection:
            now, _ = self._sql_now(connection)
            query = (
                sa.select(*_READY_COLUMNS)
                .where(tasks.c.status == TaskState.QUEUED.value, tasks.c.scheduled_at <= now)
                .order_by(tasks.c.priority.desc(), tasks.c.scheduled_at, tasks.c.id)
                .limit(limit)
            )
            if queues is not None:
                query = query.where(tasks.c.queue.in_(list(queues)))
            rows = connection.execute(query).all()
        return [
            ReadyTask(
                id=row.id,
                type=row.type,
                priority=row.priority,
                scheduled_at=row.scheduled_at,
                timeout_s=None if row.timeout_ms is None else row.timeout_ms / 1000.0,
                resources=Resources(
                    num_cpus=row.num_cpus,
                    num_gpus=row.num_gpus,
                    memory=row.memory_bytes,
                    custom=row.custom_resources or {},
                ),
                labels=row.labels or {},
                metadata=row.metadata or {},
            )
            for row in rows
        ]

    # -- leasing ----------------------------------------------------------------------------

    def lease_many(
        self,
        requests: Sequence[tuple[uuid.UUID, str | None]],
        *,
        epoch: int | None,
        ttl_s: float | None = None,
        leader_name: str = DEFAULT_LEADER_NAME,
    ) -> list[Grant]:
        """Lease each (task, node) chosen by the scheduler, in one transaction.

        With ``epoch`` the caller must hold that leader epoch, else ``NotLeaderError`` and
        nothing is leased. Tasks no longer queued and due, or locked by another writer,
        are skipped: the result lists only the leases granted. A grant clears the task's
        ``started_at``, so a retry is never timed out by its previous attempt's start.
        """
        if not requests:
            return []
        ttl = self.lease_ttl_s if ttl_s is None else ttl_s
        leases = {task_id: uuid.uuid4() for task_id, _ in requests}
        if len(leases) != len(requests):
            raise ValueError("a task is named twice in one lease request")
        with self._errors(), self.engine.begin() as connection:
            _, now_value = self._sql_now(connection)
            if self.is_postgres and self.sql_clock:
                # The epoch check is part of the statement: the leader row is read FOR
                # SHARE (a takeover waits for this lease to commit), and without it no
                # row is chosen. The first column says whether the epoch held.
                leader = (
                    "SELECT 1 FROM leader_leases WHERE name = :leader AND epoch = :epoch"
                    " AND expires_at > now() FOR SHARE"
                    if epoch is not None
                    else "SELECT 1"
                )
                rows = connection.execute(
                    sa.text(
                        f"WITH leader AS ({leader}),"
                        # SKIP LOCKED: a row another transaction holds is being changed
                        # there (cancelled, say); it is left out, never waited on.
                        " chosen AS ("
                        " SELECT id FROM tasks WHERE id = ANY(CAST(:ids AS uuid[]))"
                        " AND status = 'queued' AND scheduled_at <= now()"
                        " AND EXISTS (SELECT 1 FROM leader)"
                        " FOR UPDATE SKIP LOCKED),"
                        " leased AS ("
                        " UPDATE tasks t SET status = 'leased', lease_id = b.lease,"
                        " node_id = b.node, leased_at = now(),"
                        " lease_expires_at = now() + make_interval(secs => :ttl),"
                        " epoch = :epoch, attempt = t.attempt + 1, started_at = NULL"
                        " FROM unnest(CAST(:ids AS uuid[]), CAST(:nodes AS text[]),"
                        " CAST(:leases AS uuid[])) AS b(id, node, lease)"
                        " WHERE t.id = b.id AND t.id IN (SELECT id FROM chosen)"
                        " RETURNING t.id, t.attempt, t.lease_id, t.node_id),"
                        " attempts AS (INSERT INTO task_attempts"
                        " (task_id, attempt, lease_id, node_id, leased_at)"
                        " SELECT id, attempt, lease_id, node_id, now() FROM leased"
                        " RETURNING task_id, attempt, lease_id, node_id)"
                        " SELECT (SELECT count(*) FROM leader) AS leading, a.*"
                        " FROM (SELECT 1) AS one LEFT JOIN attempts AS a ON true"
                    ),
                    {
                        "ids": _ids(t for t, _ in requests),
                        "nodes": [node for _, node in requests],
                        "leases": _ids(leases[t] for t, _ in requests),
                        "ttl": ttl,
                        "epoch": epoch,
                        "leader": leader_name,
                    },
                ).all()
                if not rows[0].leading:
                    raise NotLeaderError(
                        f"epoch {epoch} does not hold the {leader_name!r} leader lease",
                        epoch=epoch,
                    )
                granted = {
                    row.task_id: Grant(row.task_id, row.lease_id, row.node_id, row.attempt)
                    for row in rows
                    if row.task_id is not None
                }
            else:
                at = now_value or self.clock.now(connection)
                self._check_epoch(connection, at, epoch, leader_name)
                leased = self._grant(
                    connection,
                    at,
                    [(task_id, node, leases[task_id]) for task_id, node in requests],
                    epoch,
                    ttl,
                    ordered_ids=None,
                )
                granted = {
                    lease.task.id: Grant(
                        lease.task.id, lease.lease_id, lease.task.node_id, lease.task.attempt
                    )
                    for lease in leased
                }
        return [granted[task_id] for task_id, _ in requests if task_id in granted]

    # -- the executor's transitions ---------------------------------------------------------

    def start(
        self, task_id: uuid.UUID | str, lease_id: uuid.UUID, *, worker_id: str | None = None
    ) -> Task:
        """The executor has begun running the task (fenced by its lease): ``start_many`` of
        one, ``LeaseLostError`` when it is refused. Idempotent for the lease holder."""
        task_uuid = _as_uuid(task_id)
        started = self.start_many([(task_uuid, lease_id)], worker_id=worker_id)
        if not started.tasks:
            raise LeaseLostError(
                f"lease {lease_id} on task {task_uuid} is gone", task_id=str(task_uuid)
            )
        return started.tasks[0]

    def start_many(
        self, leases: Sequence[tuple[uuid.UUID, uuid.UUID]], *, worker_id: str | None = None
    ) -> StartedBatch:
        """Mark leased tasks running, each fenced by its lease; the running tasks (with
        their payloads) in the order asked, and the refused ones.

        Idempotent for the lease holder: a task already running under the lease named (a
        retry whose first try committed, its reply lost) is returned as started, its start
        unchanged."""
        if not leases:
            return StartedBatch([], [])
        with self._errors(), self.engine.begin() as connection:
            now, now_value = self._sql_now(connection)
            if self.is_postgres and self.sql_clock:
                rows = list(
                    connection.execute(
                        sa.text(
                            "WITH started AS ("
                            " UPDATE tasks t SET status = 'running', started_at = now()"
                            " FROM unnest(CAST(:ids AS uuid[]), CAST(:leases AS uuid[]))"
                            " AS b(id, lease)"
                            " WHERE t.id = b.id AND t.lease_id = b.lease"
                            " AND t.status = 'leased' AND t.lease_expires_at > now()"
                            " RETURNING t.*),"
                            " attempts AS ("
                            " UPDATE task_attempts a SET started_at = now(), worker_id = :worker"
                            " FROM started s WHERE a.task_id = s.id AND a.attempt = s.attempt)"
                            " SELECT * FROM started"
                        ).columns(*tasks.c),
                        {
                            "ids": _ids(t for t, _ in leases),
                            "leases": _ids(lease for _, lease in leases),
                            "worker": worker_id,
                        },
                    ).mappings()
                )
            else:
                rows = []
                for task_id, lease_id in leases:
                    try:
                        row = self._fenced(
                            connection,
                            now_value or self.clock.now(connection),
                            task_id,
                            lease_id,
                            {"status": TaskState.RUNNING.value, "started_at": now},
                            states=(TaskState.LEASED.value,),
                        )
                    except LeaseLostError:
                        continue
                    connection.execute(
                        sa.update(task_attempts)
                        .where(
                            task_attempts.c.task_id == task_id,
                            task_attempts.c.attempt == row["attempt"],
                        )
                        .values(started_at=now, worker_id=worker_id)
                    )
                    rows.append(row)
            got = {row["id"] for row in rows}
            if len(got) < len(leases):
                missing = [(t, lease) for t, lease in leases if t not in got]
                rows += self._already(connection, missing, TaskState.RUNNING, now).values()
        by_id = {row["id"]: _task(row) for row in rows}
        started = [by_id[t] for t, _ in leases if t in by_id]
        return StartedBatch(
            tasks=started,
            refused=[t for t, _ in leases if t not in by_id],
            at=started[0].started_at if started else now_value,
        )

    def heartbeat_many(
        self,
        leases: Sequence[tuple[uuid.UUID, uuid.UUID]],
        *,
        ttl_s: float | None = None,
        states: Sequence[str] = LIVE,
    ) -> BatchCommit:
        """Extend each live lease by ``ttl_s``; the refused ones are gone (or, with
        ``states``, in another state: the scheduler vouches only for tasks not started)."""
        if not leases:
            return BatchCommit([], [])
        in_states = "(" + ", ".join(f"'{TaskState(state).value}'" for state in states) + ")"
        ttl = self.lease_ttl_s if ttl_s is None else ttl_s
        with self._errors(), self.engine.begin() as connection:
            if self.is_postgres and self.sql_clock:
                renewed = set(
                    connection.execute(
                        sa.text(
                            "UPDATE tasks t"
                            " SET lease_expires_at = now() + make_interval(secs => :ttl)"
                            " FROM unnest(CAST(:ids AS uuid[]), CAST(:leases AS uuid[]))"
                            " AS b(id, lease)"
                            " WHERE t.id = b.id AND t.lease_id = b.lease"
                            f" AND t.status IN {in_states} AND t.lease_expires_at > now()"
                            " RETURNING t.id"
                        ),
                        {
                            "ids": _ids(t for t, _ in leases),
                            "leases": _ids(lease for _, lease in leases),
                            "ttl": ttl,
                        },
                    ).scalars()
                )
            else:
                now = self.clock.now(connection)
                renewed = set()
                for task_id, lease_id in leases:
                    result = connection.execute(
                        sa.update(tasks)
                        .where(
                            tasks.c.id == task_id,
                            tasks.c.lease_id == lease_id,
                            tasks.c.status.in_(list(states)),
                            tasks.c.lease_expires_at > now,
                        )
                        .values(lease_expires_at=now + timedelta(seconds=ttl))
                    )
                    if result.rowcount:
                        renewed.add(task_id)
        return BatchCommit(
            committed=[t for t, _ in leases if t in renewed],
            refused=[t for t, _ in leases if t not in renewed],
        )

    def complete_many(self, successes: Sequence[Success]) -> BatchCommit:
        """Commit each task's result, exactly once, for the holder of its live lease.

        In the same transaction: the attempts are recorded, and downstream tasks whose
        upstreams have now all succeeded are released. Results must have passed
        ``check_result``. Rows whose lease is stale are refused and named; the others
        commit. A result already committed under the lease named (a retry whose first try
        committed, its reply lost) is reported committed, and not written again.
        """
        if not successes:
            return BatchCommit([], [])
        with self._errors(), self.engine.begin() as connection:
            self._durable(connection)
            now, now_value = self._sql_now(connection)
            if self.is_postgres and self.sql_clock:
                done = set(
                    connection.execute(
                        sa.text(
                            "WITH done AS ("
                            " UPDATE tasks t SET status = 'succeeded', result = b.result,"
                            " completed_at = now(), lease_expires_at = NULL, last_error = NULL,"
                            " started_at = COALESCE(b.began, t.started_at)"
                            " FROM unnest(CAST(:ids AS uuid[]), CAST(:leases AS uuid[]),"
                            " CAST(:results AS jsonb[]), CAST(:began AS timestamptz[]),"
                            " CAST(:ended AS timestamptz[])) AS b(id, lease, result, began, ended)"
                            " WHERE t.id = b.id AND t.lease_id = b.lease"
                            f" AND t.status IN {_LIVE_SQL} AND t.lease_expires_at > now()"
                            " RETURNING t.id, t.attempt, b.began, b.ended),"
                            " attempts AS ("
                            " UPDATE task_attempts a SET outcome = 'succeeded',"
                            " started_at = COALESCE(done.began, a.started_at),"
                            " finished_at = COALESCE(done.ended, now())"
                            " FROM done WHERE a.task_id = done.id AND a.attempt = done.attempt"
                            " AND a.finished_at IS NULL)"
                            " SELECT id FROM done"
                        ),
                        {
                            "ids": _ids(s.task_id for s in successes),
                            "leases": _ids(s.lease_id for s in successes),
                            "results": [
                                json.dumps(s.result, separators=(",", ":")) for s in successes
                            ],
                            "began": [s.started_at for s in successes],
                            "ended": [s.finished_at for s in successes],
                        },
                    ).scalars()
                )
            else:
                at = now_value or self.clock.now(connection)
                done = set()
                for success in successes:
                    try:
                        row = self._fenced(
                            connection,
                            at,
                            success.task_id,
                            success.lease_id,
                            {
                                "status": TaskState.SUCCEEDED.value,
                                "result": success.result,
                                "completed_at": now,
                                "lease_expires_at": None,
                                "last_error": None,
                                "started_at": sa.func.coalesce(
                                    sa.literal(success.started_at, type_=_TIME), tasks.c.started_at
                                ),
                            },
                            columns=(tasks.c.id, tasks.c.attempt),
                        )
                    except LeaseLostError:
                        continue
                    self._finish_attempt(connection, row, at, AttemptOutcome.SUCCEEDED)
                    self._record_times(connection, row, success.started_at, success.finished_at)
                    done.add(row["id"])
            if done:
                # A statement of its own, after the commits above: it must see the edges of
                # downstream tasks submitted while these rows were being written (their
                # submit holds the upstream rows FOR SHARE until it commits).
                self._release_downstream_of(connection, list(done))
                self._notify_done(connection)
            already: set[uuid.UUID] = set()
            if len(done) < len(successes):
                missing = [(s.task_id, s.lease_id) for s in successes if s.task_id not in done]
                already = set(self._already(connection, missing, TaskState.SUCCEEDED, now))
        committed = done | already
        return BatchCommit(
            committed=[s.task_id for s in successes if s.task_id in committed],
            refused=[s.task_id for s in successes if s.task_id not in committed],
        )

    def _record_times(
        self,
        connection: Connection,
        row: Any,
        started_at: datetime | None,
        finished_at: datetime | None,
    ) -> None:
        """The attempt's real start and end, as the executor measured them in its lane."""
        values = {
            name: value
            for name, value in (("started_at", started_at), ("finished_at", finished_at))
            if value is not None
        }
        if values:
            connection.execute(
                sa.update(task_attempts)
                .where(
                    task_attempts.c.task_id == row["id"],
                    task_attempts.c.attempt == row["attempt"],
                )
                .values(**values)
            )

    def _release_downstream_of(self, connection: Connection, upstream_ids: list[uuid.UUID]) -> None:
        """Downstream tasks of ``upstream_ids`` have that many fewer pending upstreams; those
        at zero are queued."""
        finished = (
            sa.select(sa.func.count())
            .select_from(task_edges)
            .where(
                task_edges.c.upstream_id.in_(upstream_ids),
                task_edges.c.downstream_id == tasks.c.id,
            )
            .scalar_subquery()
        )
        released = connection.execute(
            sa.update(tasks)
            .where(
                tasks.c.id.in_(
                    sa.select(task_edges.c.downstream_id).where(
                        task_edges.c.upstream_id.in_(upstream_ids)
                    )
                ),
                tasks.c.status == TaskState.BLOCKED.value,
            )
            .values(
                # Both expressions read the row as it was before this UPDATE.
                pending_upstreams=tasks.c.pending_upstreams - finished,
                status=sa.case(
                    (tasks.c.pending_upstreams == finished, TaskState.QUEUED.value),
                    else_=tasks.c.status,
                ),
            )
        )
        if released.rowcount:
            self._notify_work(connection)

    def fail_many(self, failures: Sequence[Failure]) -> dict[uuid.UUID, TaskState | None]:
        """Record failed attempts, each fenced by its lease: back to ``queued`` after a
        backoff, or ``dead``. Per task, its state after, or None if its lease was gone."""
        states: dict[uuid.UUID, TaskState | None] = {f.task_id: None for f in failures}
        if not failures:
            return states
        with self.transaction() as (connection, now):
            dead = False
            for failure in failures:
                try:
                    # The retry decision needs the row: read it under the fence, then move it.
                    row = self._fenced(connection, now, failure.task_id, failure.lease_id, None)
                except LeaseLostError:
                    continue
                self._finish_attempt(
                    connection, row, now, AttemptOutcome.FAILED, failure.error, failure.traceback
                )
                self._record_times(connection, row, failure.started_at, failure.finished_at)
                after = self._after_failure(connection, row, now, failure.error, failure.retryable)
                states[failure.task_id] = TaskState(after["status"])
                dead = dead or after["status"] == TaskState.DEAD.value
            if dead:
                self._notify_done(connection)
        return states

    # -- what the scheduler's services read -------------------------------------------------

    def timed_out(self, limit: int = 1000) -> list[tuple[uuid.UUID, uuid.UUID, float]]:
        """Running tasks past their timeout: (task, lease, timeout in seconds). Reads only
        live rows (``ix_tasks_live_expiry``), which the cluster's size bounds."""
        with self.read_transaction() as (connection, now):
            rows = connection.execute(
                sa.select(tasks.c.id, tasks.c.lease_id, tasks.c.started_at, tasks.c.timeout_ms)
                .where(
                    tasks.c.status == TaskState.RUNNING.value,
                    tasks.c.timeout_ms.is_not(None),
                    tasks.c.started_at.is_not(None),
                )
                .limit(limit)
            ).all()
        return [
            (row.id, row.lease_id, row.timeout_ms / 1000.0)
            for row in rows
            if now >= row.started_at + timedelta(milliseconds=row.timeout_ms)
        ]

    def lease_states(
        self, task_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[TaskState, uuid.UUID | None]]:
        """Each task's state and current lease (to find work whose lease was taken away)."""
        if not task_ids:
            return {}
        with self.read_transaction() as (connection, _):
            rows = connection.execute(
                sa.select(tasks.c.id, tasks.c.status, tasks.c.lease_id).where(
                    tasks.c.id.in_(list(task_ids))
                )
            ).all()
        return {row.id: (TaskState(row.status), row.lease_id) for row in rows}
