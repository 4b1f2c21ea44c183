"""Submitting tasks: validation, dependencies within a batch and on stored tasks,
idempotency keys, and the bulk insert."""

from __future__ import annotations

import graphlib
import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from taskray.errors import CycleError, InvalidTaskError, UnknownTaskError
from taskray.models import FAILED_STATES, SubmitResult, Task, TaskSpec, TaskState
from taskray.store.base import StoreBase, _as_uuid, _task
from taskray.store.notifications import WORK_CHANNEL
from taskray.store.tables import task_edges, tasks


def _upstreams_first(upstreams: Sequence[Sequence[int]]) -> list[int]:
    """An order of ``0..n-1`` with every node after its ``upstreams[node]``.

    ``graphlib.CycleError`` if there is none; its ``args[1]`` is the cycle.
    """
    graph = {node: ups for node, ups in enumerate(upstreams)}
    return list(graphlib.TopologicalSorter(graph).static_order())


def _cycle(error: graphlib.CycleError) -> list[int]:
    """The cycle as each node followed by one of its upstreams (``a -> b``: a depends on
    b), first and last the same node. graphlib lists it upstream first; reverse it."""
    return list(reversed(error.args[1]))


class SubmitMixin(StoreBase):
    def submit(self, spec: TaskSpec) -> SubmitResult:
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Iterable[TaskSpec]) -> list[SubmitResult]:
        """Store a batch in one transaction; all or nothing.

        A spec whose idempotency key its tenant already used (or an earlier spec of
        the batch used) returns that task with ``deduplicated=True``. ``depends_on``
        names stored task ids or keys of specs in this batch; a cycle is refused.
        """
        batch = list(specs)
        if not batch:
            return []
        keys: dict[str, int] = {}
        for index, spec in enumerate(batch):
            spec.validate(self.max_payload_bytes)
            if spec.key is not None:
                if spec.key in keys:
                    raise InvalidTaskError(f"key {spec.key!r} names two tasks in one batch")
                keys[spec.key] = index
        internal: list[list[int]] = []
        external: list[list[uuid.UUID]] = []
        for spec in batch:
            ups_internal: list[int] = []
            ups_external: list[uuid.UUID] = []
            for dep in spec.depends_on:
                if isinstance(dep, str) and dep in keys:
                    if batch[keys[dep]].tenant != spec.tenant:
                        # As with stored ids: another tenant's task is not there to see.
                        raise UnknownTaskError([dep])
                    ups_internal.append(keys[dep])
                else:
                    ups_external.append(_as_uuid(dep))
            internal.append(sorted(set(ups_internal)))
            external.append(sorted(set(ups_external)))
        # A key repeated within the batch goes to its first spec in batch order ("a repeat
        # returns the first task"): order each repeat after that first spec.
        first_with_key: dict[tuple[str, str], int] = {}
        ordering = [list(ups) for ups in internal]
        for index, spec in enumerate(batch):
            if spec.idempotency_key:
                first = first_with_key.setdefault((spec.tenant, spec.idempotency_key), index)
                if first != index:
                    ordering[index].append(first)

        def names(cycle: list[int]) -> list[str]:
            return [batch[i].key or f"#{i}:{batch[i].type}" for i in cycle]

        try:
            order = _upstreams_first(ordering)
        except graphlib.CycleError as with_repeats:
            # A cycle of the dependencies alone is named as such; only a cycle that a
            # repeated idempotency key closes gets the explanation.
            try:
                _upstreams_first(internal)
            except graphlib.CycleError as declared:
                raise CycleError(names(_cycle(declared))) from None
            raise CycleError(
                [
                    *names(_cycle(with_repeats)),
                    "(a repeated idempotency key makes a task depend on itself)",
                ]
            ) from None
        # Two submitters racing on one idempotency key: the loser's insert hits the unique
        # index; trying again finds the winner's task and returns it as a repeat.
        for round_ in range(3):
            try:
                return self._submit_tx(batch, order, internal, external)
            except sa.exc.IntegrityError as exc:
                if "idempotency" not in str(exc.orig) or round_ == 2:
                    raise
        raise AssertionError("unreachable")

    def _submit_tx(
        self,
        batch: list[TaskSpec],
        order: list[int],
        internal: list[list[int]],
        external: list[list[uuid.UUID]],
    ) -> list[SubmitResult]:
        with self.transaction() as (connection, now):
            self._durable(connection)
            existing: dict[tuple[str, str], Task] = {}
            keyed = {(s.tenant, s.idempotency_key) for s in batch if s.idempotency_key}
            if keyed:
                rows = connection.execute(
                    sa.select(tasks).where(
                        sa.tuple_(tasks.c.tenant, tasks.c.idempotency_key).in_(sorted(keyed))
                    )
                ).mappings()
                existing = {(r["tenant"], r["idempotency_key"]): _task(r) for r in rows}
            upstream_ids = sorted({u for ups in external for u in ups})
            upstream: dict[uuid.UUID, tuple[str, TaskState]] = {}
            if upstream_ids:
                # FOR SHARE: an upstream completing right now waits for this insert, so its
                # release of downstream tasks sees the new edges (no task stays blocked).
                query = sa.select(tasks.c.id, tasks.c.tenant, tasks.c.status).where(
                    tasks.c.id.in_(upstream_ids)
                )
                if self.is_postgres:
                    query = query.with_for_update(read=True)
                upstream = {
                    r["id"]: (r["tenant"], TaskState(r["status"]))
                    for r in connection.execute(query).mappings()
                }
            results: list[SubmitResult | None] = [None] * len(batch)
            rows_to_insert: list[dict[str, Any]] = []
            edges: list[tuple[uuid.UUID, uuid.UUID]] = []
            for index in order:
                spec = batch[index]
                if spec.idempotency_key:
                    first = existing.get((spec.tenant, spec.idempotency_key))
                    if first is not None:
                        results[index] = SubmitResult(first, True)
                        continue
                states: dict[uuid.UUID, TaskState] = {}
                for up_index in internal[index]:
                    up = results[up_index]
                    assert up is not None
                    states[up.task.id] = up.task.status
                for up_id in external[index]:
                    found = upstream.get(up_id)
                    if found is None or found[0] != spec.tenant:
                        raise UnknownTaskError([up_id])
                    states[up_id] = found[1]
                failed = sorted(str(u) for u, s in states.items() if s in FAILED_STATES)
                pending = sum(1 for s in states.values() if s is not TaskState.SUCCEEDED)
                status = (
                    TaskState.UPSTREAM_FAILED
                    if failed
                    else TaskState.BLOCKED
                    if pending
                    else TaskState.QUEUED
                )
                task = Task(
                    id=spec.id or uuid.uuid4(),
                    tenant=spec.tenant,
                    queue=spec.queue,
                    type=spec.type,
                    payload=spec.payload,
                    status=status,
                    priority=spec.priority,
                    attempt=0,
                    retry=spec.retry,
                    timeout_s=spec.timeout_s,
                    resources=spec.resources,
                    created_at=now,
                    scheduled_at=(spec.scheduled_at or now + timedelta(seconds=spec.delay_s)),
                    leased_at=None,
                    started_at=None,
                    completed_at=now if failed else None,
                    lease_id=None,
                    lease_expires_at=None,
                    epoch=None,
                    node_id=None,
                    pending_upstreams=0 if failed else pending,
                    idempotency_key=spec.idempotency_key,
                    result=None,
                    last_error=f"upstream failed: {failed[0]}" if failed else None,
                    labels=dict(spec.labels),
                    metadata=dict(spec.metadata),
                    encoding=spec.encoding,
                )
                results[index] = SubmitResult(task, False)
                if spec.idempotency_key:
                    existing[(spec.tenant, spec.idempotency_key)] = task
                rows_to_insert.append(self._row(task))
                edges.extend((up_id, task.id) for up_id in states)
            ready_now = any(r["status"] == TaskState.QUEUED.value for r in rows_to_insert)
            # On PostgreSQL the insert itself notifies (one round trip fewer per submit).
            notified = self._insert_tasks(connection, rows_to_insert, notify=ready_now)
            if edges:
                self._insert_edges(connection, edges)
            if ready_now and not notified:
                self._notify_work(connection)
            if any(r["status"] == TaskState.UPSTREAM_FAILED.value for r in rows_to_insert):
                # Born finished: an upstream had already failed.
                self._notify_done(connection)
        out = [r for r in results if r is not None]
        assert len(out) == len(batch)
        return out

    @staticmethod
    def _row(task: Task) -> dict[str, Any]:
        return {
            "id": task.id,
            "tenant": task.tenant,
            "queue": task.queue,
            "type": task.type,
            "payload": task.payload,
            "status": task.status.value,
            "priority": task.priority,
            "attempt": task.attempt,
            "max_retries": task.retry.max_retries,
            "replayed_attempts": 0,
            "backoff_base_s": float(task.retry.backoff_base_s),
            "backoff_cap_s": float(task.retry.backoff_cap_s),
            "backoff_jitter": float(task.retry.jitter),
            "timeout_ms": None if task.timeout_s is None else round(task.timeout_s * 1000),
            "created_at": task.created_at,
            "scheduled_at": task.scheduled_at,
            "completed_at": task.completed_at,
            "num_cpus": float(task.resources.num_cpus),
            "num_gpus": float(task.resources.num_gpus),
            "memory_bytes": task.resources.memory,
            "custom_resources": dict(task.resources.custom) or None,
            "pending_upstreams": task.pending_upstreams,
            "idempotency_key": task.idempotency_key,
            "last_error": task.last_error,
            "labels": dict(task.labels) or None,
            "metadata": dict(task.metadata) or None,
            "encoding": task.encoding.value,
        }

    _PG_RECORD = (
        "id uuid, tenant text, queue text, type text, payload jsonb, status text, priority int, "
        "attempt int, max_retries int, replayed_attempts int, backoff_base_s float8, "
        "backoff_cap_s float8, backoff_jitter float8, timeout_ms int8, created_at timestamptz, "
        "scheduled_at timestamptz, completed_at timestamptz, num_cpus float8, num_gpus float8, "
        "memory_bytes int8, custom_resources jsonb, pending_upstreams int, idempotency_key text, "
        "last_error text, labels jsonb, metadata jsonb, encoding text"
    )

    def _insert_tasks(
        self, connection: Connection, rows: list[dict[str, Any]], *, notify: bool = False
    ) -> bool:
        """Insert the rows; True if the statement also sent the new-work notification."""
        if not rows:
            return False
        if not self.is_postgres:
            # SQLite runs in-process: executemany has no round trips to save.
            connection.execute(sa.insert(tasks), rows)
            return False
        # One statement and one round trip for the whole batch: the rows travel as a
        # single JSON document. A multi-row VALUES would hit PostgreSQL's 65,535
        # parameter limit at ~2,000 rows, and executemany costs a round trip per page.
        columns = ", ".join(rows[0])
        document = json.dumps(
            [
                {
                    k: (
                        v.isoformat()
                        if isinstance(v, datetime)
                        else str(v)
                        if isinstance(v, uuid.UUID)
                        else v
                    )
                    for k, v in row.items()
                }
                for row in rows
            ],
            separators=(",", ":"),
        )
        insert = (
            f"INSERT INTO tasks ({columns}) SELECT {columns} "
            f"FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r({self._PG_RECORD})"
        )
        if notify:
            insert = (
                f"WITH inserted AS ({insert} RETURNING 1) "
                f"SELECT pg_notify('{WORK_CHANNEL}', '') FROM (SELECT 1 FROM inserted LIMIT 1) x"
            )
        connection.execute(sa.text(insert), {"rows": document})
        return notify

    def _insert_edges(
        self, connection: Connection, edges: list[tuple[uuid.UUID, uuid.UUID]]
    ) -> None:
        if not self.is_postgres:
            # SQLite runs in-process: executemany has no round trips to save.
            connection.execute(
                sa.insert(task_edges), [{"upstream_id": u, "downstream_id": d} for u, d in edges]
            )
            return
        # PostgreSQL: one statement for every edge, the two columns as two arrays.
        connection.execute(
            sa.text(
                "INSERT INTO task_edges (upstream_id, downstream_id) "
                "SELECT * FROM unnest(CAST(:ups AS uuid[]), CAST(:downs AS uuid[]))"
            ),
            {"ups": [str(u) for u, _ in edges], "downs": [str(d) for _, d in edges]},
        )
