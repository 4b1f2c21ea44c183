"""Reads: tasks, attempts, edges, counts, per-queue statistics and the ready queue.
Nothing here writes."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from taskray.errors import InvalidArgumentError, UnknownTaskError
from taskray.models import Attempt, Task, TaskState
from taskray.store.base import (
    LIVE,
    StoreBase,
    _aggregate_datetime,
    _as_uuid,
    _attempt,
    _matching,
    _task,
)
from taskray.store.tables import task_attempts, task_edges, tasks


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue of one tenant at one moment."""

    queue: str
    #: Tasks per state, and per (state, priority) for the states that wait or run.
    by_state: dict[str, int]
    by_state_priority: list[tuple[str, int, int]]
    #: Seconds the longest-waiting ready task (queued and due) has waited; None if none.
    oldest_ready_age_s: float | None
    #: Tasks that reached each terminal state within the window.
    finished_in_window: dict[str, int]
    window_s: float


class QueriesMixin(StoreBase):
    def get(self, task_id: uuid.UUID | str, *, tenant: str | None = None) -> Task:
        with self.read_transaction() as (connection, _):
            return _task(self._one(connection, _as_uuid(task_id), tenant, lock=False))

    def get_many(
        self, task_ids: Iterable[uuid.UUID | str], *, tenant: str | None = None
    ) -> list[Task]:
        """The tasks in the order asked; an unknown id raises ``UnknownTaskError``."""
        ids = [_as_uuid(t) for t in task_ids]
        if not ids:
            return []
        query = sa.select(tasks).where(tasks.c.id.in_(set(ids)))
        if tenant is not None:
            query = query.where(tasks.c.tenant == tenant)
        with self.read_transaction() as (connection, _):
            found = {r["id"]: _task(r) for r in connection.execute(query).mappings()}
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownTaskError(missing)
        return [found[i] for i in ids]

    def states_of(
        self,
        task_ids: Iterable[uuid.UUID | str],
        *,
        tenant: str | None = None,
        finished_only: bool = False,
    ) -> dict[uuid.UUID, TaskState]:
        """Each task's state, reading nothing else (a waiter polls many tasks with this and
        reads the rows of only those that finished); an unknown id raises
        ``UnknownTaskError``. With ``finished_only``, only the tasks in a terminal state
        are returned (and unknown ids are not looked for)."""
        ids = [_as_uuid(t) for t in task_ids]
        if not ids:
            return {}
        if self.is_postgres:
            # One array parameter, not thousands of bound values to render and send.
            matches = tasks.c.id == sa.any_(
                sa.cast(sa.literal([str(i) for i in set(ids)]), postgresql.ARRAY(sa.Uuid))
            )
        else:
            matches = tasks.c.id.in_(set(ids))
        query = sa.select(tasks.c.id, tasks.c.status).where(matches)
        if tenant is not None:
            query = query.where(tasks.c.tenant == tenant)
        if finished_only:
            query = query.where(tasks.c.status.in_([s.value for s in TaskState if s.is_terminal]))
        with self.read_transaction() as (connection, _):
            found = {row.id: TaskState(row.status) for row in connection.execute(query)}
        if finished_only:
            return found
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownTaskError(missing)
        return found

    def attempts(self, task_id: uuid.UUID | str, *, tenant: str | None = None) -> list[Attempt]:
        task_uuid = _as_uuid(task_id)
        with self.read_transaction() as (connection, _):
            self._one(connection, task_uuid, tenant, lock=False)
            rows = connection.execute(
                sa.select(task_attempts)
                .where(task_attempts.c.task_id == task_uuid)
                .order_by(task_attempts.c.attempt)
            ).mappings()
            return [_attempt(r) for r in rows]

    def upstreams(self, task_id: uuid.UUID | str) -> list[uuid.UUID]:
        with self.read_transaction() as (connection, _):
            return list(
                connection.execute(
                    sa.select(task_edges.c.upstream_id)
                    .where(task_edges.c.downstream_id == _as_uuid(task_id))
                    .order_by(task_edges.c.upstream_id)
                ).scalars()
            )

    def now(self) -> datetime:
        """The store's time (the database clock, or the injected one)."""
        with self.read_transaction() as (_, now):
            return now

    def live_tasks(self) -> list[Task]:
        """Tasks holding a lease (leased or running): what is placed on nodes right now."""
        with self.read_transaction() as (connection, _):
            rows = connection.execute(
                sa.select(tasks).where(tasks.c.status.in_(LIVE)).order_by(tasks.c.leased_at)
            ).mappings()
            return [_task(r) for r in rows]

    def count_by_status(
        self, *, tenant: str | None = None, queue: str | None = None
    ) -> dict[TaskState, int]:
        query = sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status)
        if tenant is not None:
            query = query.where(tasks.c.tenant == tenant)
        if queue is not None:
            query = query.where(tasks.c.queue == queue)
        with self.read_transaction() as (connection, _):
            return {TaskState(s): n for s, n in connection.execute(query)}

    def list_tasks(
        self,
        *,
        tenant: str | None = None,
        queue: str | None = None,
        status: TaskState | None = None,
        task_type: str | None = None,
        labels: Mapping[str, str] | None = None,
        created_from: datetime | None = None,
        created_before: datetime | None = None,
        after: tuple[datetime, uuid.UUID] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Tasks in creation order, filtered; every label given must match.

        ``after`` is a keyset cursor, the (created_at, id) of the last task of the previous
        page: a page costs an index range scan however deep it is, and tasks submitted
        meanwhile neither shift nor repeat the pages (a batch shares one created_at, so
        the id breaks ties).
        """
        query = sa.select(tasks).order_by(tasks.c.created_at, tasks.c.id).limit(limit)
        query = _matching(query, tenant, queue, task_type)
        if status is not None:
            query = query.where(tasks.c.status == status.value)
        for key, value in (labels or {}).items():
            query = query.where(tasks.c.labels[key].as_string() == value)
        if created_from is not None:
            query = query.where(tasks.c.created_at >= created_from)
        if created_before is not None:
            query = query.where(tasks.c.created_at < created_before)
        if after is not None:
            at, last_id = after
            query = query.where(
                sa.or_(
                    tasks.c.created_at > at,
                    sa.and_(tasks.c.created_at == at, tasks.c.id > last_id),
                )
            )
        with self.read_transaction() as (connection, _):
            return [_task(r) for r in connection.execute(query).mappings()]

    def queue_stats(
        self, *, tenant: str | None = None, queue: str | None = None, window_s: float = 300.0
    ) -> list[QueueStats]:
        """Depth by state and priority, oldest ready age and recent completions, per queue."""
        if not 0 < window_s <= 7 * 86400:
            raise InvalidArgumentError(f"window must be within (0, 7 days], got {window_s}s")

        def scoped(query: sa.Select[Any]) -> sa.Select[Any]:
            if tenant is not None:
                query = query.where(tasks.c.tenant == tenant)
            if queue is not None:
                query = query.where(tasks.c.queue == queue)
            return query

        terminal = [s.value for s in TaskState if s.is_terminal]
        with self.read_transaction() as (connection, now):
            depth = connection.execute(
                scoped(
                    sa.select(tasks.c.queue, tasks.c.status, tasks.c.priority, sa.func.count())
                ).group_by(tasks.c.queue, tasks.c.status, tasks.c.priority)
            ).all()
            oldest = connection.execute(
                scoped(
                    sa.select(tasks.c.queue, sa.func.min(tasks.c.scheduled_at)).where(
                        tasks.c.status == TaskState.QUEUED.value, tasks.c.scheduled_at <= now
                    )
                ).group_by(tasks.c.queue)
            ).all()
            finished = connection.execute(
                scoped(
                    sa.select(tasks.c.queue, tasks.c.status, sa.func.count()).where(
                        tasks.c.status.in_(terminal),
                        tasks.c.completed_at >= now - timedelta(seconds=window_s),
                    )
                ).group_by(tasks.c.queue, tasks.c.status)
            ).all()
        # min() over a UTCDateTime column comes back untyped on SQLite.
        oldest_at = {q: _aggregate_datetime(at) for q, at in oldest}
        stats: dict[str, QueueStats] = {}

        def entry(name: str) -> QueueStats:
            if name not in stats:
                at = oldest_at.get(name)
                stats[name] = QueueStats(
                    queue=name,
                    by_state={},
                    by_state_priority=[],
                    oldest_ready_age_s=None if at is None else max(0.0, (now - at).total_seconds()),
                    finished_in_window={},
                    window_s=window_s,
                )
            return stats[name]

        for name, state, priority, count in depth:
            item = entry(name)
            item.by_state[state] = item.by_state.get(state, 0) + count
            if state not in terminal:
                item.by_state_priority.append((state, priority, count))
        for name, state, count in finished:
            entry(name).finished_in_window[state] = count
        for item in stats.values():
            item.by_state_priority.sort(key=lambda t: (t[0], -t[1]))
        return [stats[name] for name in sorted(stats)]

    # -- the ready queue ----------------------------------------------------------------------

    def candidates(self, limit: int = 100, *, queues: Sequence[str] | None = None) -> list[Task]:
        """Ready tasks, highest priority first, then oldest ``scheduled_at``.

        Ready means queued with ``scheduled_at`` come; a task whose upstreams have not
        all succeeded is ``blocked``, never queued.
        """
        with self.read_transaction() as (connection, now):
            rows = connection.execute(self._ready(now, queues).limit(limit)).mappings()
            return [_task(r) for r in rows]

    def next_scheduled_at(self, *, queues: Sequence[str] | None = None) -> datetime | None:
        """When the earliest queued task becomes due (in the past if one is due now)."""
        with self.read_transaction() as (connection, _):
            if self.is_postgres:
                # The ready index leads with priority, so min(scheduled_at) over it would
                # scan every queued row (0.4 s at a million). Instead, one probe per
                # priority level in use (a loose index scan): O(levels x log n).
                in_queues = " AND queue = ANY(:queues)" if queues is not None else ""
                t_in_queues = " AND t.queue = ANY(:queues)" if queues is not None else ""
                value = connection.execute(
                    sa.text(
                        "WITH RECURSIVE levels(priority) AS ("
                        f" SELECT max(priority) FROM tasks WHERE status = 'queued'{in_queues}"
                        " UNION ALL SELECT (SELECT max(t.priority) FROM tasks t"
                        " WHERE t.status = 'queued' AND t.priority < levels.priority"
                        f"{t_in_queues})"
                        " FROM levels WHERE levels.priority IS NOT NULL)"
                        " SELECT min(first.scheduled_at) FROM levels CROSS JOIN LATERAL ("
                        " SELECT t.scheduled_at FROM tasks t"
                        " WHERE t.status = 'queued' AND t.priority = levels.priority"
                        f"{t_in_queues}"
                        " ORDER BY t.scheduled_at LIMIT 1) AS first"
                    ),
                    {"queues": list(queues)} if queues is not None else {},
                ).scalar_one_or_none()
            else:
                query = sa.select(sa.func.min(tasks.c.scheduled_at)).where(
                    tasks.c.status == TaskState.QUEUED.value
                )
                if queues is not None:
                    query = query.where(tasks.c.queue.in_(list(queues)))
                value = connection.execute(query).scalar_one_or_none()
        return None if value is None else _aggregate_datetime(value)
