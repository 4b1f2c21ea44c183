"""The task store: every state change of a task, each one transaction.

Every transition is a conditional UPDATE whose WHERE names the state (and,
for a leased task, the lease) it leaves, so a stale writer changes nothing and
is told so. Time comes from ``clock`` (the database clock unless a test injects
one) and is passed into SQL as a parameter.

The two backends share this code. Where PostgreSQL gets its own SQL (bulk
insert in one round trip, claims with ``FOR UPDATE SKIP LOCKED``), the method
says why; SQLite runs the portable path, which is safe there because every
transaction takes the single write lock up front (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, RowMapping

from taskray.errors import (
    CycleError,
    InvalidArgumentError,
    InvalidStateError,
    InvalidTaskError,
    LeaseLostError,
    NotLeaderError,
    PayloadTooLargeError,
    StoreUnavailableError,
    UnknownTaskError,
)
from taskray.models import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    FAILED_STATES,
    Attempt,
    AttemptOutcome,
    DeadLetter,
    Lease,
    LeaseRequest,
    Resources,
    RetryPolicy,
    SubmitResult,
    Task,
    TaskSpec,
    TaskState,
)
from taskray.store import engine as engines
from taskray.store.tables import (
    api_keys,
    leader_leases,
    task_attempts,
    task_edges,
    task_functions,
    tasks,
)

log = logging.getLogger(__name__)

LIVE = (TaskState.LEASED.value, TaskState.RUNNING.value)
#: PostgreSQL channel that tells schedulers new work is ready (submit, release, replay).
WORK_CHANNEL = "taskray_work"
DEFAULT_LEASE_TTL_S = 30.0
DEFAULT_LEADER_NAME = "scheduler"

#: A handler's own writes, run inside the transaction that commits its task's result.
TransactionalWrite = Callable[[Connection], None]


class Clock(Protocol):
    def now(self, connection: Connection) -> datetime: ...


class DatabaseClock:
    """The database server's clock: one time for every node (DESIGN invariant 4)."""

    def now(self, connection: Connection) -> datetime:
        if connection.dialect.name == "postgresql":
            value: datetime = connection.execute(sa.text("SELECT now()")).scalar_one()
            return value.astimezone(UTC)
        raw = connection.execute(
            sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")
        ).scalar_one()
        return datetime.fromisoformat(raw).replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Leadership:
    name: str
    holder: str
    epoch: int
    expires_at: datetime


#: What an API key may do; ``admin`` implies the others.
API_SCOPES = ("submit", "read", "admin")
#: Marks a taskray secret, so that secret scanners and people recognise a leaked one.
API_KEY_PREFIX = "trk_"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored: never the secret, only who it belongs to and what it may do."""

    id: uuid.UUID
    tenant: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


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


def _aggregate_datetime(value: datetime | str) -> datetime:
    """A raw aggregate (min/max) skips the column type's processing on SQLite."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _api_key(row: RowMapping) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        scopes=tuple(row["scopes"] or ()),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def _task(row: RowMapping) -> Task:
    return Task(
        id=row["id"],
        tenant=row["tenant"],
        queue=row["queue"],
        type=row["type"],
        payload=row["payload"],
        status=TaskState(row["status"]),
        priority=row["priority"],
        attempt=row["attempt"],
        retry=RetryPolicy(
            max_retries=row["max_retries"],
            backoff_base_s=row["backoff_base_s"],
            backoff_cap_s=row["backoff_cap_s"],
            jitter=row["backoff_jitter"],
        ),
        timeout_s=None if row["timeout_ms"] is None else row["timeout_ms"] / 1000.0,
        resources=Resources(
            num_cpus=row["num_cpus"],
            num_gpus=row["num_gpus"],
            memory=row["memory_bytes"],
            custom=row["custom_resources"] or {},
        ),
        created_at=row["created_at"],
        scheduled_at=row["scheduled_at"],
        leased_at=row["leased_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        lease_id=row["lease_id"],
        lease_expires_at=row["lease_expires_at"],
        epoch=row["epoch"],
        node_id=row["node_id"],
        pending_upstreams=row["pending_upstreams"],
        idempotency_key=row["idempotency_key"],
        result=row["result"],
        last_error=row["last_error"],
        labels=row["labels"] or {},
        metadata=row["metadata"] or {},
    )


def _attempt(row: RowMapping) -> Attempt:
    return Attempt(
        task_id=row["task_id"],
        attempt=row["attempt"],
        lease_id=row["lease_id"],
        node_id=row["node_id"],
        worker_id=row["worker_id"],
        leased_at=row["leased_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        outcome=None if row["outcome"] is None else AttemptOutcome(row["outcome"]),
        error=row["error"],
        traceback=row["traceback"],
    )


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise UnknownTaskError([value]) from None


def _find_cycle(n: int, edges: Sequence[Sequence[int]]) -> list[int] | None:
    """A cycle in the graph ``i -> edges[i]`` (upstreams), as a list of nodes, or None."""
    colour = [0] * n  # 0 unvisited, 1 on the stack, 2 done
    for root in range(n):
        if colour[root]:
            continue
        stack: list[tuple[int, int]] = [(root, 0)]
        path: list[int] = [root]
        colour[root] = 1
        while stack:
            node, i = stack[-1]
            if i < len(edges[node]):
                stack[-1] = (node, i + 1)
                nxt = edges[node][i]
                if colour[nxt] == 1:
                    return [*path[path.index(nxt) :], nxt]
                if colour[nxt] == 0:
                    colour[nxt] = 1
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                colour[node] = 2
                stack.pop()
                path.pop()
    return None


def _topological_order(n: int, edges: Sequence[Sequence[int]]) -> list[int]:
    """Upstreams before downstreams; ``edges`` has no cycle."""
    order: list[int] = []
    done = [False] * n
    for root in range(n):
        if done[root]:
            continue
        stack = [(root, iter(edges[root]))]
        while stack:
            node, it = stack[-1]
            for nxt in it:
                if not done[nxt]:
                    stack.append((nxt, iter(edges[nxt])))
                    break
            else:
                stack.pop()
                if not done[node]:
                    done[node] = True
                    order.append(node)
    return order


def _json_size(value: Any) -> int:
    try:
        return len(json.dumps(value, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidTaskError(f"value must be JSON-serialisable: {exc}") from None


class WorkListener(Protocol):
    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s``; True when told that new work is ready."""
        ...

    def close(self) -> None: ...


class _PollingListener:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._closed = threading.Event()

    def wait(self, timeout_s: float) -> bool:
        # No notifications on SQLite: waking after a short interval makes the caller poll.
        self._closed.wait(max(0.0, min(timeout_s, self.interval_s)))
        return False

    def close(self) -> None:
        self._closed.set()


class _PostgresListener:
    def __init__(self, url: sa.URL) -> None:
        libpq_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            self._connection = psycopg.connect(libpq_url, autocommit=True)
        except psycopg.OperationalError:
            raise StoreUnavailableError("cannot open a listening connection to the store") from None
        self._connection.execute(f"LISTEN {WORK_CHANNEL}")

    def wait(self, timeout_s: float) -> bool:
        woke = False
        for _ in self._connection.notifies(timeout=max(0.0, timeout_s), stop_after=1):
            woke = True
        if woke:
            # Fold a burst of notifications into one wake-up.
            for _ in self._connection.notifies(timeout=0.0):
                pass
        return woke

    def close(self) -> None:
        self._connection.close()


class Store:
    """Durable task storage on PostgreSQL or SQLite."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    ) -> None:
        self.engine = engine
        self.clock: Clock = clock or DatabaseClock()
        self.rng = rng or random.Random()
        self.max_payload_bytes = max_payload_bytes
        self.lease_ttl_s = lease_ttl_s
        self.is_postgres = engine.dialect.name == "postgresql"

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        migrate: bool = True,
        engine_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> Store:
        """Connect to ``url`` (default: ``TASKRAY_DATABASE_URL`` or the embedded SQLite file).

        With ``migrate`` the schema is upgraded to the current revision; without,
        a schema at another revision raises ``MigrationError``.
        """
        url = url or engines.default_database_url()
        engine = engines.create_engine(url, **(engine_options or {}))
        try:
            if migrate:
                engines.migrate(engine)
            else:
                engines.check_schema(engine)
        except sa.exc.OperationalError as exc:
            engine.dispose()
            raise StoreUnavailableError(
                f"cannot reach the database at {engines.redacted(url)}: {type(exc.orig).__name__}"
            ) from None
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, **options)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[tuple[Connection, datetime]]:
        """One transaction and the time it runs at; rolled back if the block raises."""
        try:
            with self.engine.begin() as connection:
                yield connection, self.clock.now(connection)
        except sa.exc.DataError as exc:
            # A value the database cannot hold (PostgreSQL refuses NUL characters in text
            # and JSON): bad input, told as such, never an internal error.
            raise InvalidTaskError(
                f"the store cannot hold a value given ({type(exc.orig).__name__})"
            ) from None
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            # The driver's message can name the server; say only what kind of failure it was.
            raise StoreUnavailableError(
                f"the task store cannot be reached ({type(exc.orig).__name__})"
            ) from None

    def _lock(self, query: sa.Select[Any], *, skip_locked: bool = False) -> sa.Select[Any]:
        # SQLite has no row locks; its IMMEDIATE transactions already exclude other writers.
        if self.is_postgres:
            return query.with_for_update(skip_locked=skip_locked)
        return query

    def _one(
        self, connection: Connection, task_id: uuid.UUID, tenant: str | None, *, lock: bool
    ) -> RowMapping:
        query = sa.select(tasks).where(tasks.c.id == task_id)
        if tenant is not None:
            query = query.where(tasks.c.tenant == tenant)
        row = connection.execute(self._lock(query) if lock else query).mappings().first()
        if row is None:
            raise UnknownTaskError([task_id])
        return row

    # -- submit ---------------------------------------------------------------------------

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
        cycle = _find_cycle(len(batch), internal)
        if cycle is not None:
            raise CycleError([batch[i].key or f"#{i}:{batch[i].type}" for i in cycle])
        # A key repeated within the batch goes to its first spec in batch order ("a repeat
        # returns the first task"): order each repeat after that first spec.
        first_with_key: dict[tuple[str, str], int] = {}
        ordering = [list(ups) for ups in internal]
        for index, spec in enumerate(batch):
            if spec.idempotency_key:
                first = first_with_key.setdefault((spec.tenant, spec.idempotency_key), index)
                if first != index:
                    ordering[index].append(first)
        cycle = _find_cycle(len(batch), ordering)
        if cycle is not None:
            raise CycleError(
                [batch[i].key or f"#{i}:{batch[i].type}" for i in cycle]
                + ["(a repeated idempotency key makes a task depend on itself)"]
            )
        order = _topological_order(len(batch), ordering)
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
                )
                results[index] = SubmitResult(task, False)
                if spec.idempotency_key:
                    existing[(spec.tenant, spec.idempotency_key)] = task
                rows_to_insert.append(self._row(task))
                edges.extend((up_id, task.id) for up_id in states)
            self._insert_tasks(connection, rows_to_insert)
            if edges:
                self._insert_edges(connection, edges)
            if any(r["status"] == TaskState.QUEUED.value for r in rows_to_insert):
                self._notify_work(connection)
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
        }

    _PG_RECORD = (
        "id uuid, tenant text, queue text, type text, payload jsonb, status text, priority int, "
        "attempt int, max_retries int, replayed_attempts int, backoff_base_s float8, "
        "backoff_cap_s float8, backoff_jitter float8, timeout_ms int8, created_at timestamptz, "
        "scheduled_at timestamptz, completed_at timestamptz, num_cpus float8, num_gpus float8, "
        "memory_bytes int8, custom_resources jsonb, pending_upstreams int, idempotency_key text, "
        "last_error text, labels jsonb, metadata jsonb"
    )

    def _insert_tasks(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if not self.is_postgres:
            connection.execute(sa.insert(tasks), rows)
            return
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
        connection.execute(
            sa.text(
                f"INSERT INTO tasks ({columns}) SELECT {columns} "
                f"FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r({self._PG_RECORD})"
            ),
            {"rows": document},
        )

    def _insert_edges(
        self, connection: Connection, edges: list[tuple[uuid.UUID, uuid.UUID]]
    ) -> None:
        if not self.is_postgres:
            connection.execute(
                sa.insert(task_edges), [{"upstream_id": u, "downstream_id": d} for u, d in edges]
            )
            return
        connection.execute(
            sa.text(
                "INSERT INTO task_edges (upstream_id, downstream_id) "
                "SELECT * FROM unnest(CAST(:ups AS uuid[]), CAST(:downs AS uuid[]))"
            ),
            {"ups": [str(u) for u, _ in edges], "downs": [str(d) for _, d in edges]},
        )

    # -- reads ----------------------------------------------------------------------------

    def get(self, task_id: uuid.UUID | str, *, tenant: str | None = None) -> Task:
        with self.transaction() as (connection, _):
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
        with self.transaction() as (connection, _):
            found = {r["id"]: _task(r) for r in connection.execute(query).mappings()}
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownTaskError(missing)
        return [found[i] for i in ids]

    def attempts(self, task_id: uuid.UUID | str, *, tenant: str | None = None) -> list[Attempt]:
        task_uuid = _as_uuid(task_id)
        with self.transaction() as (connection, _):
            self._one(connection, task_uuid, tenant, lock=False)
            rows = connection.execute(
                sa.select(task_attempts)
                .where(task_attempts.c.task_id == task_uuid)
                .order_by(task_attempts.c.attempt)
            ).mappings()
            return [_attempt(r) for r in rows]

    def upstreams(self, task_id: uuid.UUID | str) -> list[uuid.UUID]:
        with self.transaction() as (connection, _):
            return list(
                connection.execute(
                    sa.select(task_edges.c.upstream_id)
                    .where(task_edges.c.downstream_id == _as_uuid(task_id))
                    .order_by(task_edges.c.upstream_id)
                ).scalars()
            )

    def now(self) -> datetime:
        """The store's time (the database clock, or the injected one)."""
        with self.transaction() as (_, now):
            return now

    def live_tasks(self) -> list[Task]:
        """Tasks holding a lease (leased or running): what is placed on nodes right now."""
        with self.transaction() as (connection, _):
            rows = connection.execute(
                sa.select(tasks).where(tasks.c.status.in_(LIVE)).order_by(tasks.c.leased_at)
            ).mappings()
            return [_task(r) for r in rows]

    def listener(self, poll_interval_s: float = 0.2) -> WorkListener:
        """Something to wait on for new ready work: LISTEN/NOTIFY on PostgreSQL, a short
        poll on SQLite (which has no notifications)."""
        if self.is_postgres:
            return _PostgresListener(self.engine.url)
        return _PollingListener(poll_interval_s)

    def count_by_status(
        self, *, tenant: str | None = None, queue: str | None = None
    ) -> dict[TaskState, int]:
        query = sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status)
        if tenant is not None:
            query = query.where(tasks.c.tenant == tenant)
        if queue is not None:
            query = query.where(tasks.c.queue == queue)
        with self.transaction() as (connection, _):
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
        for column, value in (
            (tasks.c.tenant, tenant),
            (tasks.c.queue, queue),
            (tasks.c.type, task_type),
        ):
            if value is not None:
                query = query.where(column == value)
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
        with self.transaction() as (connection, _):
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
        with self.transaction() as (connection, now):
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

    # -- scheduling -------------------------------------------------------------------------

    def _ready(self, now: datetime, queues: Sequence[str] | None) -> sa.Select[Any]:
        query = (
            sa.select(tasks)
            .where(tasks.c.status == TaskState.QUEUED.value, tasks.c.scheduled_at <= now)
            .order_by(tasks.c.priority.desc(), tasks.c.scheduled_at, tasks.c.id)
        )
        if queues is not None:
            query = query.where(tasks.c.queue.in_(list(queues)))
        return query

    def candidates(self, limit: int = 100, *, queues: Sequence[str] | None = None) -> list[Task]:
        """Ready tasks, highest priority first, then oldest ``scheduled_at``.

        Ready means queued with ``scheduled_at`` come; a task whose upstreams have not
        all succeeded is ``blocked``, never queued.
        """
        with self.transaction() as (connection, now):
            rows = connection.execute(self._ready(now, queues).limit(limit)).mappings()
            return [_task(r) for r in rows]

    def next_scheduled_at(self, *, queues: Sequence[str] | None = None) -> datetime | None:
        """When the earliest queued task becomes due (in the past if one is due now)."""
        query = sa.select(sa.func.min(tasks.c.scheduled_at)).where(
            tasks.c.status == TaskState.QUEUED.value
        )
        if queues is not None:
            query = query.where(tasks.c.queue.in_(list(queues)))
        with self.transaction() as (connection, _):
            value = connection.execute(query).scalar_one_or_none()
        if value is None:
            return None
        # A raw aggregate skips the column type's processing on SQLite.
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value

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

    # -- execution --------------------------------------------------------------------------

    def _live(
        self,
        connection: Connection,
        now: datetime,
        task_id: uuid.UUID,
        lease_id: uuid.UUID,
        states: Sequence[str] = LIVE,
    ) -> RowMapping:
        """The task's row, locked, if ``lease_id`` is its live, unexpired lease."""
        query = sa.select(tasks).where(
            tasks.c.id == task_id,
            tasks.c.lease_id == lease_id,
            tasks.c.status.in_(list(states)),
            tasks.c.lease_expires_at > now,
        )
        row = connection.execute(self._lock(query)).mappings().first()
        if row is None:
            raise LeaseLostError(
                f"lease {lease_id} on task {task_id} is gone", task_id=str(task_id)
            )
        return row

    def _fenced_update(
        self,
        connection: Connection,
        now: datetime,
        task_id: uuid.UUID,
        lease_id: uuid.UUID,
        values: dict[str, Any],
        states: Sequence[str] = LIVE,
    ) -> RowMapping:
        """One conditional UPDATE fenced by the live, unexpired lease; the row after it.

        The hot path (start, complete) reads nothing first: the WHERE clause is the fence,
        and a row count of zero means the lease is gone.
        """
        changed = (
            connection.execute(
                sa.update(tasks)
                .where(
                    tasks.c.id == task_id,
                    tasks.c.lease_id == lease_id,
                    tasks.c.status.in_(list(states)),
                    tasks.c.lease_expires_at > now,
                )
                .values(**values)
                .returning(*tasks.c)
            )
            .mappings()
            .first()
        )
        if changed is None:
            raise LeaseLostError(
                f"lease {lease_id} on task {task_id} is gone", task_id=str(task_id)
            )
        return changed

    def _transition(
        self,
        connection: Connection,
        row: RowMapping,
        values: dict[str, Any],
    ) -> RowMapping:
        """Move ``row`` out of the state (and lease) it was read in; zero rows changed means a
        concurrent writer got there first."""
        changed = (
            connection.execute(
                sa.update(tasks)
                .where(
                    tasks.c.id == row["id"],
                    tasks.c.status == row["status"],
                    tasks.c.lease_id.is_(None)
                    if row["lease_id"] is None
                    else tasks.c.lease_id == row["lease_id"],
                )
                .values(**values)
                .returning(*tasks.c)
            )
            .mappings()
            .first()
        )
        if changed is None:
            if row["lease_id"] is not None:
                raise LeaseLostError(
                    f"task {row['id']} changed under its lease", task_id=str(row["id"])
                )
            raise InvalidStateError(
                f"task {row['id']} changed concurrently", task_id=str(row["id"])
            )
        return changed

    def _finish_attempt(
        self,
        connection: Connection,
        row: RowMapping,
        now: datetime,
        outcome: AttemptOutcome,
        error: str | None = None,
        traceback: str | None = None,
    ) -> None:
        connection.execute(
            sa.update(task_attempts)
            .where(
                task_attempts.c.task_id == row["id"],
                task_attempts.c.attempt == row["attempt"],
                task_attempts.c.finished_at.is_(None),
            )
            .values(finished_at=now, outcome=outcome.value, error=error, traceback=traceback)
        )

    def start(
        self, task_id: uuid.UUID | str, lease_id: uuid.UUID, *, worker_id: str | None = None
    ) -> Task:
        """The executor has begun running the task (fenced by its lease)."""
        task_uuid = _as_uuid(task_id)
        with self.transaction() as (connection, now):
            row = self._fenced_update(
                connection,
                now,
                task_uuid,
                lease_id,
                {"status": TaskState.RUNNING.value, "started_at": now},
                states=(TaskState.LEASED.value,),
            )
            connection.execute(
                sa.update(task_attempts)
                .where(
                    task_attempts.c.task_id == task_uuid,
                    task_attempts.c.attempt == row["attempt"],
                )
                .values(started_at=now, worker_id=worker_id)
            )
            return _task(row)

    def heartbeat(
        self, task_id: uuid.UUID | str, lease_id: uuid.UUID, *, ttl_s: float | None = None
    ) -> datetime:
        """Extend the lease and return its new expiry; ``LeaseLostError`` when it is gone."""
        task_uuid = _as_uuid(task_id)
        with self.transaction() as (connection, now):
            expires = now + timedelta(seconds=self.lease_ttl_s if ttl_s is None else ttl_s)
            result = connection.execute(
                sa.update(tasks)
                .where(
                    tasks.c.id == task_uuid,
                    tasks.c.lease_id == lease_id,
                    tasks.c.status.in_(LIVE),
                    tasks.c.lease_expires_at > now,
                )
                .values(lease_expires_at=expires)
            )
            if result.rowcount != 1:
                raise LeaseLostError(
                    f"lease {lease_id} on task {task_uuid} is gone", task_id=str(task_uuid)
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
            row = self._fenced_update(
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
            self._finish_attempt(connection, row, now, AttemptOutcome.SUCCEEDED)
            self._release_downstream(connection, task_uuid)
            if write is not None:
                write(connection)
            return _task(row)

    def _notify_work(self, connection: Connection) -> None:
        # Delivered at commit, and only then: a listener never wakes for work it cannot see.
        if self.is_postgres:
            connection.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": WORK_CHANNEL})

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
            row = self._live(connection, now, task_uuid, lease_id)
            self._finish_attempt(connection, row, now, AttemptOutcome.FAILED, error, traceback)
            return _task(self._after_failure(connection, row, now, error, retryable))

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
        """Every task downstream of a failed one, transitively, becomes ``upstream_failed``."""
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

    def cancel(
        self, task_id: uuid.UUID | str, *, tenant: str | None = None, reason: str = "cancelled"
    ) -> Task:
        """Cancel a task that has not finished. A leased or running task loses its lease, so
        its executor's next heartbeat or commit is refused; its downstream tasks fail."""
        task_uuid = _as_uuid(task_id)
        with self.transaction() as (connection, now):
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
            return reaped

    # -- dead letters -----------------------------------------------------------------------

    def _dead(
        self,
        tenant: str | None,
        queue: str | None,
        task_type: str | None,
        older_than: datetime | None,
    ) -> sa.Select[Any]:
        query = sa.select(tasks).where(tasks.c.status == TaskState.DEAD.value)
        for column, value in (
            (tasks.c.tenant, tenant),
            (tasks.c.queue, queue),
            (tasks.c.type, task_type),
        ):
            if value is not None:
                query = query.where(column == value)
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

    # -- functions shipped by value ---------------------------------------------------------

    def put_function(self, digest: str, name: str, blob: bytes) -> None:
        """Store a pickled function once per content digest (re-running a notebook cell that
        defines the same function adds nothing)."""
        with self.transaction() as (connection, now):
            insert = postgresql.insert if self.is_postgres else sqlite.insert
            connection.execute(
                insert(task_functions)
                .values(digest=digest, name=name[:200], blob=blob, created_at=now)
                .on_conflict_do_nothing()
            )

    def get_function(self, digest: str) -> bytes:
        with self.transaction() as (connection, _):
            blob = connection.execute(
                sa.select(task_functions.c.blob).where(task_functions.c.digest == digest)
            ).scalar_one_or_none()
        if blob is None:
            raise UnknownTaskError([f"function {digest}"])
        return bytes(blob)

    # -- API keys ---------------------------------------------------------------------------

    def create_key(self, tenant: str, name: str, scopes: Sequence[str]) -> tuple[ApiKey, str]:
        """A new key and its secret. The secret is returned here once and never stored."""
        chosen = tuple(dict.fromkeys(scopes))
        unknown = [s for s in chosen if s not in API_SCOPES]
        if not chosen or unknown:
            raise InvalidArgumentError(
                f"scopes must be some of {', '.join(API_SCOPES)}; got {list(chosen)}"
            )
        for label, value in (("tenant", tenant), ("name", name)):
            if not value or len(value) > 200:
                raise InvalidArgumentError(f"{label} must be 1-200 characters")
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = uuid.uuid4()
        with self.transaction() as (connection, now):
            connection.execute(
                sa.insert(api_keys).values(
                    id=key_id,
                    tenant=tenant,
                    name=name,
                    scopes=list(chosen),
                    key_hash=_hash_secret(secret),
                    created_at=now,
                    revoked_at=None,
                )
            )
        return ApiKey(key_id, tenant, name, chosen, now, None), secret

    def list_keys(
        self, *, tenant: str | None = None, include_revoked: bool = False
    ) -> list[ApiKey]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self.transaction() as (connection, _):
            return [_api_key(r) for r in connection.execute(query).mappings()]

    def revoke_key(self, key_id: uuid.UUID | str) -> ApiKey:
        """Revoke a key for good; revoking a revoked key changes nothing."""
        try:
            key_uuid = key_id if isinstance(key_id, uuid.UUID) else uuid.UUID(str(key_id))
        except ValueError:
            raise InvalidArgumentError(f"no API key {key_id!r}") from None
        with self.transaction() as (connection, now):
            connection.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == key_uuid, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = (
                connection.execute(sa.select(api_keys).where(api_keys.c.id == key_uuid))
                .mappings()
                .first()
            )
        if row is None:
            raise InvalidArgumentError(f"no API key {key_uuid}")
        return _api_key(row)

    def authenticate(self, secret: str) -> ApiKey | None:
        """The live key whose secret this is, or None. The lookup is by hash, so the
        secret itself never reaches SQL or a log."""
        if not secret.startswith(API_KEY_PREFIX) or len(secret) > 200:
            return None
        with self.transaction() as (connection, _):
            row = (
                connection.execute(
                    sa.select(api_keys).where(
                        api_keys.c.key_hash == _hash_secret(secret),
                        api_keys.c.revoked_at.is_(None),
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else _api_key(row)

    # -- leadership -------------------------------------------------------------------------

    def acquire_leadership(
        self,
        holder: str,
        *,
        ttl_s: float = 15.0,
        name: str = DEFAULT_LEADER_NAME,
        fresh: bool = False,
    ) -> int | None:
        """Take or renew the leader lease; returns the epoch held, or None if another leads.

        A holder that renews in time keeps its epoch; a takeover (or a holder coming back
        after its lease ran out) gets a new, higher epoch, which fences the old one. With
        ``fresh`` a holder still in its lease takes a new epoch too: a restarted process
        under the same holder name fences whatever its previous incarnation still sends.
        """
        with self.transaction() as (connection, now):
            expires = now + timedelta(seconds=ttl_s)
            insert = (
                postgresql.insert(leader_leases)
                if self.is_postgres
                else sqlite.insert(leader_leases)
            )
            connection.execute(
                insert.values(
                    name=name, holder=holder, epoch=0, expires_at=now
                ).on_conflict_do_nothing()
            )
            row = (
                connection.execute(
                    self._lock(sa.select(leader_leases).where(leader_leases.c.name == name))
                )
                .mappings()
                .one()
            )
            if row["expires_at"] > now and row["holder"] != holder:
                return None
            renewal = row["holder"] == holder and row["expires_at"] > now and not fresh
            epoch = row["epoch"] if renewal else row["epoch"] + 1
            connection.execute(
                sa.update(leader_leases)
                .where(leader_leases.c.name == name, leader_leases.c.epoch == row["epoch"])
                .values(holder=holder, epoch=epoch, expires_at=expires)
            )
            return int(epoch)

    def release_leadership(self, holder: str, *, name: str = DEFAULT_LEADER_NAME) -> None:
        with self.transaction() as (connection, now):
            connection.execute(
                sa.update(leader_leases)
                .where(leader_leases.c.name == name, leader_leases.c.holder == holder)
                .values(expires_at=now)
            )

    def leadership(self, *, name: str = DEFAULT_LEADER_NAME) -> Leadership | None:
        """The current leader, if its lease has not run out."""
        with self.transaction() as (connection, now):
            row = (
                connection.execute(
                    sa.select(leader_leases).where(
                        leader_leases.c.name == name, leader_leases.c.expires_at > now
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        return Leadership(row["name"], row["holder"], row["epoch"], row["expires_at"])
