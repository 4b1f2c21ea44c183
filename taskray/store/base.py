"""What every part of the store shares: the engine, the clock, transactions, the row
converters, and the one fence every write on a task goes through.

The concern modules (``submit``, ``queries``, ``leasing``, ``transitions``,
``dead_letter``, ``keys``, ``leadership``, ``functions``) each hold a mixin on
``StoreBase``; ``taskray.store.store`` combines them into ``Store``. A mixin calls
``StoreBase``, itself, and only those mixins it names as its bases: whatever several
concerns need lives here.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping

from taskray.errors import (
    InvalidStateError,
    InvalidTaskError,
    LeaseLostError,
    StoreUnavailableError,
    UnknownTaskError,
)
from taskray.models import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Attempt,
    AttemptOutcome,
    Encoding,
    Resources,
    RetryPolicy,
    Task,
    TaskState,
)
from taskray.store import engine as engines
from taskray.store.notifications import (
    DONE_CHANNEL,
    WORK_CHANNEL,
    WorkListener,
    notify,
    open_listener,
)
from taskray.store.tables import task_attempts, tasks

#: The states that hold a lease: placed on a node, and maybe running there.
LIVE = (TaskState.LEASED.value, TaskState.RUNNING.value)
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


# -- rows to models ---------------------------------------------------------------------------


def _matching(
    query: sa.Select[Any], tenant: str | None, queue: str | None, task_type: str | None
) -> sa.Select[Any]:
    """``query`` narrowed to the tenant, queue and task type given (None: any)."""
    for column, value in (
        (tasks.c.tenant, tenant),
        (tasks.c.queue, queue),
        (tasks.c.type, task_type),
    ):
        if value is not None:
            query = query.where(column == value)
    return query


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
        encoding=Encoding(row["encoding"]),
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


def _json_size(value: Any) -> int:
    try:
        return len(json.dumps(value, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidTaskError(f"value must be JSON-serialisable: {exc}") from None


def _aggregate_datetime(value: datetime | str) -> datetime:
    """A raw aggregate (min/max) skips the column type's processing on SQLite."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StoreBase:
    """The connection to the store and the plumbing every operation shares."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        relaxed_commits: bool = False,
    ) -> None:
        self.engine = engine
        self.clock: Clock = clock or DatabaseClock()
        self.rng = rng or random.Random()
        self.max_payload_bytes = max_payload_bytes
        self.lease_ttl_s = lease_ttl_s
        self.is_postgres = engine.dialect.name == "postgresql"
        #: PostgreSQL's own ``now()`` can stand in the statements for the clock (no
        #: ``SELECT now()`` round trip per transaction) unless a test injected a clock.
        self.sql_clock = self.is_postgres and isinstance(self.clock, DatabaseClock)
        #: Commits return before the disk has them, except those that must not be lost
        #: (``_durable``: results, submits, cancels). Safe for the rest: the WAL is
        #: replayed in order, so a server crash loses a suffix of such writes, never one
        #: in the middle, and each of them is one the system already recovers from: a
        #: lost lease, start or heartbeat puts the task back to be run again (its
        #: executor's commit is then refused by the fence), a lost failure record is
        #: found again by the reaper. At-least-once execution and exactly-once commit hold.
        self.relaxed_commits = relaxed_commits and self.is_postgres

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        migrate: bool = True,
        engine_options: dict[str, Any] | None = None,
        relaxed_commits: bool = False,
        **options: Any,
    ) -> Self:
        """Connect to ``url`` (default: ``TASKRAY_DATABASE_URL`` or the embedded SQLite file).

        With ``migrate`` the schema is upgraded to the current revision; without,
        a schema at another revision raises ``MigrationError``.
        """
        url = url or engines.default_database_url()
        engine = engines.create_engine(
            url, relaxed_commits=relaxed_commits, **(engine_options or {})
        )
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
        return cls(engine, relaxed_commits=relaxed_commits, **options)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[tuple[Connection, datetime]]:
        """One transaction and the time it runs at; rolled back if the block raises."""
        with self._errors(), self.engine.begin() as connection:
            yield connection, self.clock.now(connection)

    @contextmanager
    def read_transaction(self) -> Iterator[tuple[Connection, datetime]]:
        """A transaction that only reads: on SQLite it takes no write lock (WAL readers
        never wait), so reads do not queue behind the executors' writes."""
        with self.read_connection() as connection:
            yield connection, self.clock.now(connection)

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """``read_transaction`` without reading the clock (for statements that use the
        database's own ``now()``)."""
        with self._errors(), self.engine.connect() as connection:
            connection.execution_options(**{engines.READ_ONLY: True})
            with connection.begin():
                yield connection

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Driver errors as the store's own: bad input, or a store that cannot be reached."""
        try:
            yield
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

    def _durable(self, connection: Connection) -> None:
        """This transaction's commit waits for the disk, whatever the session's default
        (a result, a submit or a cancel must survive a server crash once acknowledged)."""
        if self.relaxed_commits:
            connection.exec_driver_sql("SET LOCAL synchronous_commit = on")

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

    def _ready(self, now: datetime, queues: Sequence[str] | None) -> sa.Select[Any]:
        """Queued tasks that are due, in the order they are taken (``candidates``, ``claim``)."""
        query = (
            sa.select(tasks)
            .where(tasks.c.status == TaskState.QUEUED.value, tasks.c.scheduled_at <= now)
            .order_by(tasks.c.priority.desc(), tasks.c.scheduled_at, tasks.c.id)
        )
        if queues is not None:
            query = query.where(tasks.c.queue.in_(list(queues)))
        return query

    # -- the fence ----------------------------------------------------------------------------
    #
    # Two guards, for two kinds of writer (DESIGN: every transition is one conditional
    # UPDATE whose WHERE names the state, and lease, it leaves):
    #
    # - ``_fenced``: the writer holds a lease (the executor: start, heartbeat, complete,
    #   fail). It names the task and its lease; the WHERE requires that lease to be the
    #   task's live, unexpired one. Nothing is read first.
    # - ``_transition``: the writer read (and locked) the row in this transaction and moves
    #   it out of exactly the state and lease it read: for writers without a lease (cancel,
    #   the reaper, replay) and for the second step of a fenced read (fail).

    def _fenced(
        self,
        connection: Connection,
        now: datetime,
        task_id: uuid.UUID,
        lease_id: uuid.UUID,
        values: Mapping[str, Any] | None,
        *,
        states: Sequence[str] = LIVE,
        columns: Sequence[sa.ColumnElement[Any]] = tuple(tasks.c),
    ) -> RowMapping:
        """Apply ``values`` to the task only if ``lease_id`` is its live, unexpired lease
        (and its state one of ``states``): one conditional UPDATE, returning ``columns`` of
        the row after it. With ``values=None`` the row is read and locked instead, for a
        writer that must see it before it decides. ``LeaseLostError`` when the fence fails.
        """
        fence = (
            tasks.c.id == task_id,
            tasks.c.lease_id == lease_id,
            tasks.c.status.in_(list(states)),
            tasks.c.lease_expires_at > now,
        )
        statement: sa.Executable
        if values is None:
            statement = self._lock(sa.select(*columns).where(*fence))
        else:
            statement = sa.update(tasks).where(*fence).values(**values).returning(*columns)
        row = connection.execute(statement).mappings().first()
        if row is None:
            raise LeaseLostError(
                f"lease {lease_id} on task {task_id} is gone", task_id=str(task_id)
            )
        return row

    def _already(
        self,
        connection: Connection,
        pairs: Sequence[tuple[uuid.UUID, uuid.UUID]],
        state: TaskState,
        now: datetime | sa.ColumnElement[Any],
    ) -> dict[uuid.UUID, RowMapping]:
        """The rows of ``pairs`` already in ``state`` under the very lease named: what a
        retried start or complete finds when its first try committed but the reply was lost.
        The retry is then told it succeeded, and nothing is written again. A running task's
        lease must still be live; a result, once committed, stands."""
        lease_of = dict(pairs)
        query = sa.select(tasks).where(
            tasks.c.id.in_(list(lease_of)), tasks.c.status == state.value
        )
        if state.is_live:
            query = query.where(tasks.c.lease_expires_at > now)
        return {
            row["id"]: row
            for row in connection.execute(query).mappings()
            if row["lease_id"] == lease_of[row["id"]]
        }

    def _transition(
        self, connection: Connection, row: RowMapping, values: Mapping[str, Any]
    ) -> RowMapping:
        """Move ``row`` out of the state (and lease) it was read in; the row after it. Zero
        rows changed means a concurrent writer got there first."""
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

    # -- notifications ------------------------------------------------------------------------

    def _notify_work(self, connection: Connection) -> None:
        """New ready work (a task queued and due, or soon): wakes the schedulers."""
        notify(connection, WORK_CHANNEL)

    def _notify_done(self, connection: Connection) -> None:
        """One or more tasks reached a terminal state: wakes whoever waits for results."""
        notify(connection, DONE_CHANNEL)

    def listener(self, poll_interval_s: float = 0.2) -> WorkListener:
        """Something to wait on for new ready work: LISTEN/NOTIFY on PostgreSQL, a short
        poll on SQLite (which has no notifications)."""
        return open_listener(self.engine.url, WORK_CHANNEL, poll_interval_s)

    def done_listener(self, poll_interval_s: float = 0.05) -> WorkListener:
        """Something to wait on for tasks finishing (any terminal state): LISTEN/NOTIFY on
        PostgreSQL, a short poll on SQLite. A wake-up says only that some task finished;
        the waiter reads the tasks it waits for."""
        return open_listener(self.engine.url, DONE_CHANNEL, poll_interval_s)
