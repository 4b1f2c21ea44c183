"""Dead letters: list, replay (with a fresh retry budget, reviving what failed
downstream) and purge."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from taskray.errors import InvalidStateError, UnknownTaskError
from taskray.models import FAILED_STATES, Task, TaskState
from taskray.store.base import StoreBase, _as_uuid, _matching, _task
from taskray.store.tables import task_attempts, task_edges, tasks


class DeadLetterMixin(StoreBase):
    def _dead(
        self,
        tenant: str | None,
        queue: str | None,
        task_type: str | None,
        older_than: datetime | None,
    ) -> sa.Select[Any]:
        query = sa.select(tasks).where(tasks.c.status == TaskState.DEAD.value)
        query = _matching(query, tenant, queue, task_type)
        if older_than is not None:
            query = query.where(tasks.c.completed_at < older_than)
        return query

    def list_dead(
        self,
        *,
        tenant: str | None = None,
        queue: str | None = None,
        task_type: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        query = (
            self._dead(tenant, queue, task_type, None)
            .order_by(tasks.c.completed_at.desc(), tasks.c.id)
            .limit(limit)
        )
        with self.transaction() as (connection, _):
            return [_task(r) for r in connection.execute(query).mappings()]

    def replay(
        self,
        task_ids: Iterable[uuid.UUID | str] | None = None,
        *,
        tenant: str | None = None,
        queue: str | None = None,
        task_type: str | None = None,
    ) -> list[Task]:
        """Put dead tasks back in the queue with a fresh retry budget.

        Named ids must all be dead (else nothing changes); without ids, every dead task
        matching the filters is replayed. Downstream tasks that failed only because of
        them go back to waiting.
        """
        with self.transaction() as (connection, now):
            if task_ids is not None:
                ids = [_as_uuid(t) for t in task_ids]
                query = self._lock(self._dead(tenant, None, None, None).where(tasks.c.id.in_(ids)))
                rows = list(connection.execute(query).mappings())
                found = {r["id"] for r in rows}
                missing = [i for i in ids if i not in found]
                if missing:
                    known = sa.select(tasks.c.id).where(tasks.c.id.in_(missing))
                    if tenant is not None:
                        known = known.where(tasks.c.tenant == tenant)
                    if set(connection.execute(known).scalars()) != set(missing):
                        raise UnknownTaskError(missing)
                    raise InvalidStateError(
                        "only dead tasks can be replayed: " + ", ".join(map(str, missing))
                    )
            else:
                query = self._lock(self._dead(tenant, queue, task_type, None))
                rows = list(connection.execute(query).mappings())
            replayed = []
            for row in rows:
                replayed.append(
                    _task(
                        self._transition(
                            connection,
                            row,
                            {
                                "status": TaskState.QUEUED.value,
                                "scheduled_at": now,
                                "completed_at": None,
                                "replayed_attempts": row["attempt"],
                            },
                        )
                    )
                )
            self._revive_downstream(connection, [r["id"] for r in rows])
            if replayed:
                self._notify_work(connection)
            return replayed

    def _revive_downstream(self, connection: Connection, roots: list[uuid.UUID]) -> None:
        """Tasks marked ``upstream_failed`` whose upstreams are no longer failed wait again."""
        frontier = roots
        failed_states = [s.value for s in FAILED_STATES]
        while frontier:
            candidates = list(
                connection.execute(
                    sa.select(tasks.c.id)
                    .where(
                        tasks.c.id.in_(
                            sa.select(task_edges.c.downstream_id).where(
                                task_edges.c.upstream_id.in_(frontier)
                            )
                        ),
                        tasks.c.status == TaskState.UPSTREAM_FAILED.value,
                    )
                    .order_by(tasks.c.id)
                ).scalars()
            )
            revived = []
            for candidate in candidates:
                states = list(
                    connection.execute(
                        sa.select(tasks.c.status)
                        .join(task_edges, task_edges.c.upstream_id == tasks.c.id)
                        .where(task_edges.c.downstream_id == candidate)
                    ).scalars()
                )
                if any(s in failed_states for s in states):
                    continue
                pending = sum(1 for s in states if s != TaskState.SUCCEEDED.value)
                connection.execute(
                    sa.update(tasks)
                    .where(
                        tasks.c.id == candidate, tasks.c.status == TaskState.UPSTREAM_FAILED.value
                    )
                    .values(
                        status=(TaskState.BLOCKED if pending else TaskState.QUEUED).value,
                        pending_upstreams=pending,
                        completed_at=None,
                        last_error=None,
                    )
                )
                revived.append(candidate)
            frontier = revived

    def purge(
        self,
        task_ids: Iterable[uuid.UUID | str] | None = None,
        *,
        tenant: str | None = None,
        queue: str | None = None,
        task_type: str | None = None,
        older_than: datetime | None = None,
    ) -> int:
        """Delete dead tasks (with their attempts and edges); returns how many."""
        with self.transaction() as (connection, _):
            chosen = self._dead(tenant, queue, task_type, older_than).with_only_columns(tasks.c.id)
            if task_ids is not None:
                chosen = chosen.where(tasks.c.id.in_([_as_uuid(t) for t in task_ids]))
            ids = list(connection.execute(chosen).scalars())
            if not ids:
                return 0
            connection.execute(sa.delete(task_attempts).where(task_attempts.c.task_id.in_(ids)))
            connection.execute(
                sa.delete(task_edges).where(
                    sa.or_(task_edges.c.upstream_id.in_(ids), task_edges.c.downstream_id.in_(ids))
                )
            )
            return connection.execute(sa.delete(tasks).where(tasks.c.id.in_(ids))).rowcount
