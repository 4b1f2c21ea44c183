"""Leasing: the scheduler's placement decisions (``lease``) and pull-style claims
(``claim``), each fenced by the leader epoch when one is given."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from taskray.errors import InvalidTaskError, NotLeaderError
from taskray.models import Lease, LeaseRequest, TaskState
from taskray.store.base import DEFAULT_LEADER_NAME, StoreBase, _task
from taskray.store.tables import leader_leases, task_attempts, tasks


class LeasingMixin(StoreBase):
    def lease(
        self,
        requests: Sequence[LeaseRequest],
        *,
        epoch: int | None,
        ttl_s: float | None = None,
        leader_name: str = DEFAULT_LEADER_NAME,
    ) -> list[Lease]:
        """Lease the chosen tasks, each on its node.

        With ``epoch`` the caller must hold that leader epoch, else ``NotLeaderError`` and
        nothing is leased. Tasks no longer queued and due (another writer took or changed
        them) are skipped: the result lists only the leases granted.
        """
        if not requests:
            return []
        ids = [r.task_id for r in requests]
        if len(set(ids)) != len(ids):
            raise InvalidTaskError("a task is named twice in one lease request")
        with self.transaction() as (connection, now):
            self._check_epoch(connection, now, epoch, leader_name)
            granted = [(r.task_id, r.node_id, uuid.uuid4()) for r in requests]
            return self._grant(connection, now, granted, epoch, ttl_s, ordered_ids=None)

    def claim(
        self,
        limit: int,
        *,
        node_id: str | None = None,
        epoch: int | None = None,
        ttl_s: float | None = None,
        queues: Sequence[str] | None = None,
        leader_name: str = DEFAULT_LEADER_NAME,
    ) -> list[Lease]:
        """Lease up to ``limit`` ready tasks in priority order, in one transaction.

        For workers that pull without a placement decision; concurrent claimers never
        receive the same task.
        """
        if limit <= 0:
            return []
        with self.transaction() as (connection, now):
            self._check_epoch(connection, now, epoch, leader_name)
            if self.is_postgres:
                # SKIP LOCKED: concurrent claimers pass over each other's rows instead of
                # queueing on them, so N claimers get N disjoint batches at once.
                query = (
                    self._ready(now, queues)
                    .with_only_columns(tasks.c.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            else:
                # SQLite: no row locks; the IMMEDIATE transaction already excludes others.
                query = self._ready(now, queues).with_only_columns(tasks.c.id).limit(limit)
            ids = list(connection.execute(query).scalars())
            granted = [(task_id, node_id, uuid.uuid4()) for task_id in ids]
            return self._grant(connection, now, granted, epoch, ttl_s, ordered_ids=ids)

    def _check_epoch(
        self, connection: Connection, now: datetime, epoch: int | None, name: str
    ) -> None:
        if epoch is None:
            return
        query = sa.select(leader_leases.c.epoch).where(
            leader_leases.c.name == name,
            leader_leases.c.epoch == epoch,
            leader_leases.c.expires_at > now,
        )
        if self.is_postgres:
            # FOR SHARE holds off a takeover (which updates this row) until this lease commits.
            # SQLite needs nothing: the takeover cannot write before this transaction ends.
            query = query.with_for_update(read=True)
        if connection.execute(query).first() is None:
            raise NotLeaderError(
                f"epoch {epoch} does not hold the {name!r} leader lease", epoch=epoch
            )

    def _grant(
        self,
        connection: Connection,
        now: datetime,
        granted: list[tuple[uuid.UUID, str | None, uuid.UUID]],
        epoch: int | None,
        ttl_s: float | None,
        ordered_ids: list[uuid.UUID] | None,
    ) -> list[Lease]:
        if not granted:
            return []
        expires = now + timedelta(seconds=self.lease_ttl_s if ttl_s is None else ttl_s)
        ids = [g[0] for g in granted]
        # Lock the requested rows that are still queued and due; on PostgreSQL skip any row
        # another transaction holds: it is being leased or changed there.
        lockable = sa.select(tasks.c.id).where(
            tasks.c.id.in_(ids),
            tasks.c.status == TaskState.QUEUED.value,
            tasks.c.scheduled_at <= now,
        )
        available = set(connection.execute(self._lock(lockable, skip_locked=True)).scalars())
        chosen = [g for g in granted if g[0] in available]
        if not chosen:
            return []
        params = [
            {"b_id": task_id, "b_node": node, "b_lease": lease_id}
            for task_id, node, lease_id in chosen
        ]
        connection.execute(
            sa.update(tasks)
            .where(tasks.c.id == sa.bindparam("b_id"), tasks.c.status == TaskState.QUEUED.value)
            .values(
                status=TaskState.LEASED.value,
                lease_id=sa.bindparam("b_lease"),
                node_id=sa.bindparam("b_node"),
                leased_at=now,
                lease_expires_at=expires,
                epoch=epoch,
                attempt=tasks.c.attempt + 1,
                # A new attempt has not started: its timeout counts from its own start.
                started_at=None,
            ),
            params,
        )
        rows = {
            r["id"]: r
            for r in connection.execute(
                sa.select(tasks).where(tasks.c.id.in_([c[0] for c in chosen]))
            ).mappings()
        }
        connection.execute(
            sa.insert(task_attempts),
            [
                {
                    "task_id": task_id,
                    "attempt": rows[task_id]["attempt"],
                    "lease_id": lease_id,
                    "node_id": node,
                    "leased_at": now,
                }
                for task_id, node, lease_id in chosen
            ],
        )
        leases = [
            Lease(task=_task(rows[task_id]), lease_id=lease_id, expires_at=expires)
            for task_id, _node, lease_id in chosen
        ]
        if ordered_ids is not None:
            position = {task_id: i for i, task_id in enumerate(ordered_ids)}
            leases.sort(key=lambda lease: position[lease.task.id])
        return leases
