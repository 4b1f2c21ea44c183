"""Does a scheduler pass cost the same with a million tasks queued as with a thousand?

    .venv/bin/python bench/scheduler_scale.py                         # 1k and 1M queued
    .venv/bin/python bench/scheduler_scale.py --sizes 1000,300000 --loop-s 10

For each backlog size, in a child process of its own (so that its RSS and its Ray are its
own) and a PostgreSQL database of its own (dropped at the end, also on Ctrl-C):

1. build the backlog: ``size`` queued no-op tasks (``bench.handlers:noop``), priorities 0-9,
   0.1% delayed by an hour, 1% asking for a GPU; plus ``size / 10`` finished (succeeded)
   tasks with their attempts, since finished history must not slow a pass either. Small
   backlogs go through ``Store.submit_many`` in chunks; large ones are one
   ``INSERT ... SELECT ... FROM generate_series`` writing the same column values (checked
   against rows ``submit_many`` wrote in the same database), then ``VACUUM ANALYZE``;
2. time the calls a pass and the scheduler's services make (median and p95 of
   ``--reps``), with 128 tasks held live (64 leased, 64 running) so the services have
   rows to read: ``ready(1024)``, ``ready(64)``, ``lease_many`` of 64 (each time put back
   to exactly the state it was in by a direct UPDATE, so the backlog never changes),
   ``heartbeat_many`` and ``lease_states`` of those 64, ``next_scheduled_at``, ``reap``,
   ``timed_out``, ``live_tasks``, and the policy's ``place`` on the head of the window as
   ``Scheduler._schedule`` builds it (four made-up nodes); and the shared buffers each of
   their SQL statements touches (``EXPLAIN (ANALYZE, BUFFERS)``, a figure the machine's
   noise does not move); also two proposed replacements for ``next_scheduled_at``'s query
   (a loose index scan on ``ix_tasks_ready``; a partial index on ``scheduled_at``, created
   in a transaction that is rolled back);
3. run the real ``Scheduler.tick`` in this process against a local Ray (2 CPUs, and one
   logical GPU so the GPU tasks can be placed) for ``--loop-s`` seconds after an untimed
   warm-up (at least 500 tasks ended: Ray's first workers take seconds to start, and lanes
   fill only once a type's duration is known), timing every pass; the backlog is topped up
   between passes (outside the timing) so it stays at its size; this process's RSS is
   sampled throughout.

The parent prints one table (operation, each size, ratio of the last size to the first)
and the RSS lines, and, for any operation whose cost or buffers grow with the backlog,
its plan at the largest size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Nothing here imports Ray at module level: the child sets Ray's environment first.
import psutil
import sqlalchemy as sa

from bench.ray_bench_common import (
    DEFAULT_ADMIN_URL,
    REPO_ROOT,
    RUNTIME_ENV,
    ensure_ray_gone,
    fmt,
    percentile,
    postgres_database,
    put_repo_on_pythonpath,
    ray_processes,
    table,
)

TASK_TYPE = "bench.handlers:noop"
#: Held live during the timed calls: the first half leased, the second half running.
HELD_LIVE = 128
LEASE_BATCH = 64
HISTORY_FRACTION = 0.1
#: Of every 1,000 tasks: which index asks for a GPU (1 in 100) and which is delayed (1).
GPU_EVERY, GPU_AT = 100, 37
DELAYED_EVERY, DELAYED_AT = 1000, 500
DELAY_S = 3600.0
#: Backlogs up to this size are built by submit_many alone (``--build auto``).
SUBMIT_MAX = 50_000
#: In the SQL build, this many queued tasks go through submit_many first: the reference
#: rows the SQL-written ones are checked against.
REFERENCE_ROWS = 1_000
#: An operation's database work "grows" when its buffers at the largest size exceed the
#: smallest size's GROWS_BUFFERS times and BUFFERS_PER_ROW per row it returned (reading
#: 1,024 rows of a large table costs about a buffer a row, of a tiny one far fewer: that
#: is the table's size, not work growing with it). Slower by the clock alone: GROWS_TIME.
GROWS_TIME, GROWS_BUFFERS, BUFFERS_PER_ROW = 2.0, 3.0, 4
MIB = 1024 * 1024
#: The warm-up runs until this many tasks ended (Ray's first worker processes take seconds
#: to start on a busy machine, and lanes fill only once a type's duration is known).
WARMUP_TASKS = 500
WARMUP_LIMIT_S = 240.0


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's high-water mark (VmHWM): everything since it started."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class RssSampler:
    """Samples this process's RSS on a thread; ``peak`` since the last ``reset``."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak = rss()
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, int(self._process.memory_info().rss))

    def reset(self) -> None:
        self.peak = rss()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, rss())


# -- building the backlog ---------------------------------------------------------------------


def specs(start: int, count: int, rng: random.Random) -> list[Any]:
    """Tasks ``start .. start+count-1`` of the backlog, as the SDK would submit them."""
    from taskray.models import Resources, TaskSpec

    return [
        TaskSpec(
            type=TASK_TYPE,
            priority=rng.randrange(10),
            delay_s=DELAY_S if i % DELAYED_EVERY == DELAYED_AT else 0.0,
            resources=Resources(num_gpus=1.0) if i % GPU_EVERY == GPU_AT else Resources(),
        )
        for i in range(start, start + count)
    ]


#: The columns and values ``SubmitMixin._row`` writes for ``specs()``; ``g`` is the task's
#: index in the backlog (generate_series), ``random()`` is seeded per statement.
_QUEUED_SELECT = f"""
SELECT gen_random_uuid(), 'default', 'default', '{TASK_TYPE}', NULL, 'queued',
  floor(random() * 10)::int, 0, 3, 0, 1.0, 300.0, 0.5, NULL, now(),
  CASE WHEN g % {DELAYED_EVERY} = {DELAYED_AT}
       THEN now() + make_interval(secs => {DELAY_S}) ELSE now() END,
  NULL, 1.0, CASE WHEN g % {GPU_EVERY} = {GPU_AT} THEN 1.0 ELSE 0.0 END, 0, NULL, 0,
  NULL, NULL, NULL, NULL
FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g
"""
_COLUMNS = (
    "id, tenant, queue, type, payload, status, priority, attempt, max_retries, "
    "replayed_attempts, backoff_base_s, backoff_cap_s, backoff_jitter, timeout_ms, "
    "created_at, scheduled_at, completed_at, num_cpus, num_gpus, memory_bytes, "
    "custom_resources, pending_upstreams, idempotency_key, last_error, labels, metadata"
)
#: What must agree between rows submit_many wrote and rows the SQL build wrote.
_SIGNATURE = (
    "tenant, queue, type, payload, status, attempt, max_retries, replayed_attempts, "
    "backoff_base_s, backoff_cap_s, backoff_jitter, timeout_ms, completed_at IS NULL, "
    "num_cpus, num_gpus, memory_bytes, custom_resources, pending_upstreams, "
    "idempotency_key, last_error, labels, metadata, scheduled_at > created_at, "
    "leased_at IS NULL, started_at IS NULL, lease_id IS NULL, epoch IS NULL, node_id IS NULL"
)


def insert_queued_sql(connection: sa.Connection, first: int, count: int, seed: float) -> None:
    connection.execute(sa.text("SELECT setseed(:seed)"), {"seed": seed})
    connection.execute(
        sa.text(f"INSERT INTO tasks ({_COLUMNS}) {_QUEUED_SELECT}"),
        {"first": first, "last": first + count - 1},
    )


def insert_history_sql(connection: sa.Connection, count: int) -> None:
    """``count`` succeeded no-op tasks, finished an hour to a day ago, with their attempt
    rows, as ``lease_many`` + ``start_many`` + ``complete_many`` leave them."""
    connection.execute(sa.text("SELECT setseed(0.25)"))
    connection.execute(
        sa.text(
            "WITH done AS ("
            f" INSERT INTO tasks ({_COLUMNS}, leased_at, started_at, lease_id, epoch, node_id,"
            " result)"
            f" SELECT gen_random_uuid(), 'default', 'default', '{TASK_TYPE}', NULL, 'succeeded',"
            " floor(random() * 10)::int, 1, 3, 0, 1.0, 300.0, 0.5, NULL, t, t, t + interval"
            " '40 ms', 1.0, 0.0, 0, NULL, 0, NULL, NULL, NULL, NULL, t + interval '10 ms',"
            " t + interval '20 ms', gen_random_uuid(), 1, 'node-0', 'null'::jsonb"
            " FROM (SELECT now() - make_interval(secs => 3600 + random() * 82800) AS t"
            "       FROM generate_series(1, :count)) AS s"
            " RETURNING id, lease_id, node_id, leased_at, started_at, completed_at)"
            " INSERT INTO task_attempts (task_id, attempt, lease_id, node_id, worker_id,"
            " leased_at, started_at, finished_at, outcome)"
            " SELECT id, 1, lease_id, node_id, 'worker-0', leased_at, started_at, completed_at,"
            " 'succeeded' FROM done"
        ),
        {"count": count},
    )


def build_backlog(
    store: Any, admin_engine: sa.Engine, size: int, how: str, chunk: int
) -> dict[str, Any]:
    """The backlog and the history; returns how it was built and how long it took."""
    rng = random.Random(42)
    history = round(size * HISTORY_FRACTION)
    began = time.perf_counter()
    with store.engine.begin() as connection:
        insert_history_sql(connection, history)
    history_s = time.perf_counter() - began
    how = how if how != "auto" else ("submit" if size <= SUBMIT_MAX else "sql")
    began = time.perf_counter()
    if how == "submit":
        for start in range(0, size, chunk):
            store.submit_many(specs(start, min(chunk, size - start), rng))
        described = f"Store.submit_many in chunks of {chunk:,}"
    else:
        reference = min(REFERENCE_ROWS, size)
        store.submit_many(specs(0, reference, rng))
        with store.engine.connect() as connection:
            reference_at = connection.execute(sa.text("SELECT max(created_at) FROM tasks")).scalar()
        for start in range(reference, size, chunk * 10):
            with store.engine.begin() as connection:
                count = min(chunk * 10, size - start)
                insert_queued_sql(connection, start, count, seed=(start % 997) / 997)
        check_signatures(store.engine, reference_at)
        described = (
            f"{reference:,} by Store.submit_many, the rest by INSERT ... SELECT FROM "
            f"generate_series in statements of {chunk * 10:,} rows (same column values, checked)"
        )
    queued_s = time.perf_counter() - began
    began = time.perf_counter()
    with admin_engine.connect() as connection:
        connection.exec_driver_sql("VACUUM ANALYZE tasks")
        connection.exec_driver_sql("VACUUM ANALYZE task_attempts")
    vacuum_s = time.perf_counter() - began
    with store.engine.connect() as connection:
        counts = dict(
            connection.execute(sa.text("SELECT status, count(*) FROM tasks GROUP BY status")).all()
        )
        sizes = dict(
            connection.execute(
                sa.text(
                    "SELECT relname, pg_relation_size(oid) FROM pg_class"
                    " WHERE relname IN ('tasks', 'task_attempts', 'ix_tasks_ready',"
                    " 'ix_tasks_live_expiry', 'tasks_pkey', 'ix_tasks_tenant_status_created')"
                )
            ).all()
        )
    return {
        "how": described,
        "queued_s": queued_s,
        "history_s": history_s,
        "vacuum_s": vacuum_s,
        "counts": counts,
        "relation_mib": {k: v / MIB for k, v in sizes.items()},
    }


def check_signatures(engine: sa.Engine, reference_at: datetime) -> None:
    """The SQL-written queued rows have exactly the column values submit_many wrote."""
    with engine.connect() as connection:
        by_submit = set(
            connection.execute(
                sa.text(
                    f"SELECT DISTINCT {_SIGNATURE} FROM tasks"
                    " WHERE status = 'queued' AND created_at = :at"
                ),
                {"at": reference_at},
            ).all()
        )
        by_sql = set(
            connection.execute(
                sa.text(
                    f"SELECT DISTINCT {_SIGNATURE} FROM tasks"
                    " WHERE status = 'queued' AND created_at <> :at"
                ),
                {"at": reference_at},
            ).all()
        )
    if by_submit != by_sql:
        raise AssertionError(
            f"SQL-built rows differ from submit_many's: only submit {by_submit - by_sql}, "
            f"only SQL {by_sql - by_submit}"
        )


class Refill:
    """Keeps the queued backlog at its size while the loop runs: as many new tasks as were
    dispatched, in one INSERT, between passes (outside their timing)."""

    def __init__(self, engine: sa.Engine, start: int) -> None:
        self.engine = engine
        self.next_index = start
        self.owed = 0
        self.added = 0
        self.seconds = 0.0

    def after_pass(self, dispatched: int, at_least: int = 256) -> None:
        self.owed += dispatched
        if self.owed < at_least:
            return
        began = time.perf_counter()
        with self.engine.begin() as connection:
            insert_queued_sql(connection, self.next_index, self.owed, seed=random.random())
        self.seconds += time.perf_counter() - began
        self.next_index += self.owed
        self.added += self.owed
        self.owed = 0


# -- timing the calls -------------------------------------------------------------------------


def timed(fn: Callable[[], Any], reps: int, warmup: int = 3) -> tuple[list[float], Any]:
    """Seconds per call over ``reps`` calls (after ``warmup`` untimed), and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    seconds = []
    for _ in range(reps):
        began = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - began)
    return seconds, result


@contextmanager
def captured(engine: sa.Engine) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (and their parameters) sent through ``engine`` in the block."""
    statements: list[tuple[str, Any]] = []

    def record(_c: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def explain(engine: sa.Engine, statements: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Runs each statement on ``tasks`` under EXPLAIN (ANALYZE, BUFFERS), each undone
    afterwards; the shared buffers they touched, their execution time, and their plans."""
    with engine.connect() as connection:
        try:
            return explain_on(connection, statements)
        finally:
            connection.rollback()


def explain_on(connection: sa.Connection, statements: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``explain`` inside the connection's transaction: each run is rolled back to a
    savepoint (a write runs for real under EXPLAIN ANALYZE), the rest of the transaction
    stays (an index the caller created in it, say)."""
    import psycopg

    buffers = 0
    exec_ms = 0.0
    plans = []
    raw = connection.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    for statement, parameters in statements:
        if "tasks" not in statement:
            continue
        cursor = psycopg.ClientCursor(raw)
        try:
            cursor.execute("SAVEPOINT bench_explain")
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters)
            row = cursor.fetchone()
            assert row is not None
            document = row[0][0]
            top = document["Plan"]
            buffers += int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
            exec_ms += float(document["Execution Time"])
            cursor.execute("ROLLBACK TO SAVEPOINT bench_explain")
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            text = "\n".join(_short(r[0]) for r in cursor.fetchall())
            plans.append(f"{_short(' '.join(statement.split()), 300)}\n{text}")
            cursor.execute("ROLLBACK TO SAVEPOINT bench_explain")
        finally:
            cursor.close()
    return {"buffers": buffers, "exec_ms": exec_ms, "plans": plans}


#: What ``next_scheduled_at`` asks, as it asks it.
NEXT_DUE_SQL = "SELECT min(scheduled_at) FROM tasks WHERE status = 'queued'"
#: Proposal 1, no schema change: the same answer from the existing ``ix_tasks_ready``, one
#: index probe per distinct priority (a loose index scan), instead of a scan of every
#: queued row.
NEXT_DUE_SKIP_SCAN_SQL = """
WITH RECURSIVE levels(priority) AS (
  SELECT max(priority) FROM tasks WHERE status = 'queued'
  UNION ALL
  SELECT (SELECT max(t.priority) FROM tasks t
          WHERE t.status = 'queued' AND t.priority < levels.priority)
  FROM levels WHERE levels.priority IS NOT NULL
)
SELECT min(first.scheduled_at) FROM levels CROSS JOIN LATERAL (
  SELECT t.scheduled_at FROM tasks t
  WHERE t.status = 'queued' AND t.priority = levels.priority
  ORDER BY t.scheduled_at LIMIT 1
) AS first
"""
#: Proposal 2: a partial index that answers min() with one probe (one more index to write
#: per submit and per lease).
NEXT_DUE_INDEX_SQL = (
    "CREATE INDEX ix_tasks_queued_scheduled ON tasks (scheduled_at) WHERE status = 'queued'"
)


def measure_sql(engine: sa.Engine, sql: str, reps: int, setup: str | None = None) -> dict[str, Any]:
    """``sql`` timed ``reps`` times (a transaction each, as the store runs it) and
    explained; with ``setup``, all of it in one transaction after ``setup``, rolled back."""
    seconds = []
    value = None
    with engine.connect() as connection:
        try:
            if setup is not None:
                connection.execute(sa.text(setup))
            for rep in range(reps + 3):
                if setup is None:
                    connection.rollback()
                began = time.perf_counter()
                value = connection.execute(sa.text(sql)).scalar()
                if rep >= 3:
                    seconds.append(time.perf_counter() - began)
            explained = explain_on(connection, [(sql, None)])
        finally:
            connection.rollback()
    return {"ms": [s * 1e3 for s in seconds], "rows": int(value is not None), **explained}


def _short(line: str, width: int = 160) -> str:
    """Plans name 64 uuids in a row: keep lines readable."""
    return line if len(line) <= width else line[: width - 3] + "..."


def made_up_nodes() -> list[Any]:
    """Three CPU nodes and a GPU node, all free: what the policy call is given."""
    from taskray.policy.types import NodeView

    def node(name: str, cpus: float, gpus: float) -> NodeView:
        total = {"CPU": cpus, "memory": 64.0 * 1024**3}
        if gpus:
            total["GPU"] = gpus
        return NodeView(node_id=name, total=total, free=dict(total))

    return [node("cpu-a", 16, 0), node("cpu-b", 16, 0), node("cpu-c", 16, 0), node("gpu-a", 8, 4)]


def measure_calls(store: Any, reps: int) -> dict[str, dict[str, Any]]:
    """Each call the pass and its services make, timed; the backlog is left as it was."""
    from taskray.models import TaskState
    from taskray.policy.placement import place
    from taskray.policy.types import PlacementRequest
    from taskray.scheduler.core import SchedulerConfig, _slots, demand_of

    holder = f"bench-calls-{uuid.uuid4().hex[:8]}"
    epoch = store.acquire_leadership(holder, ttl_s=600.0, fresh=True)
    assert epoch is not None
    results: dict[str, dict[str, Any]] = {}

    def record(name: str, fn: Callable[[], Any], rows: Callable[[Any], int]) -> None:
        seconds, last = timed(fn, reps)
        with captured(store.engine) as statements:
            fn()
        results[name] = {
            "ms": [s * 1e3 for s in seconds],
            "rows": rows(last),
            **explain(store.engine, statements),
        }

    held = store.lease_many(
        [(t.id, "node-held") for t in store.ready(HELD_LIVE)], epoch=epoch, ttl_s=600.0
    )
    running = held[HELD_LIVE // 2 :]
    store.start_many([(g.task_id, g.lease_id) for g in running], worker_id="bench")
    try:
        record("store.ready(1024)", lambda: store.ready(1024), len)
        record("store.ready(64)", lambda: store.ready(64), len)

        # lease_many of the 64 at the head, then exactly back (untimed), 'reps' times.
        lease_ms: list[float] = []
        heartbeat_ms: list[float] = []
        states_ms: list[float] = []
        lease_statements: list[tuple[str, Any]] = []
        granted = 0
        for rep in range(reps + 3):
            head = store.ready(LEASE_BATCH)
            with captured(store.engine) as statements:
                began = time.perf_counter()
                grants = store.lease_many([(t.id, "node-a") for t in head], epoch=epoch, ttl_s=30.0)
                leased_s = time.perf_counter() - began
            pairs = [(g.task_id, g.lease_id) for g in grants]
            began = time.perf_counter()
            store.heartbeat_many(pairs, ttl_s=30.0, states=(TaskState.LEASED.value,))
            heartbeat_s = time.perf_counter() - began
            began = time.perf_counter()
            store.lease_states([g.task_id for g in grants])
            states_s = time.perf_counter() - began
            put_back(store.engine, grants)
            if rep >= 3:
                lease_ms.append(leased_s * 1e3)
                heartbeat_ms.append(heartbeat_s * 1e3)
                states_ms.append(states_s * 1e3)
                granted = len(grants)
                lease_statements = list(statements)
        results[f"store.lease_many({LEASE_BATCH})"] = {
            "ms": lease_ms,
            "rows": granted,
            # Re-run in a rolled-back transaction: the tasks are queued again by now.
            **explain(store.engine, lease_statements),
        }
        results[f"store.heartbeat_many({LEASE_BATCH})"] = {
            "ms": heartbeat_ms,
            "rows": granted,
            "buffers": None,
        }
        results[f"store.lease_states({LEASE_BATCH})"] = {
            "ms": states_ms,
            "rows": granted,
            "buffers": None,
        }

        record("store.next_scheduled_at()", store.next_scheduled_at, lambda v: int(v is not None))
        results["  proposal: loose index scan (SQL)"] = measure_sql(
            store.engine, NEXT_DUE_SKIP_SCAN_SQL, reps
        )
        results["  proposal: partial index (SQL)"] = measure_sql(
            store.engine, NEXT_DUE_SQL, reps, setup=NEXT_DUE_INDEX_SQL
        )
        record("store.reap()", store.reap, len)
        record("store.timed_out()", store.timed_out, len)
        record("store.live_tasks()", store.live_tasks, len)

        # The policy call on the window as Scheduler._schedule builds it for these nodes.
        config = SchedulerConfig()
        nodes = made_up_nodes()
        lanes_wanted = sum(_slots(n) for n in nodes) + config.lease_ahead * len(nodes)
        window = min(config.window, max(64, lanes_wanted * config.max_lane_tasks))
        ready = store.ready(window)
        head = ready[: 4 * lanes_wanted + 16]
        now = datetime.now(UTC)

        def policy() -> Any:
            return place(PlacementRequest(tasks=[demand_of(t) for t in head], nodes=nodes, now=now))

        seconds, plan = timed(policy, reps)
        results["policy place() on the window's head"] = {
            "ms": [s * 1e3 for s in seconds],
            "rows": f"{len(plan.placements)}/{len(head)}/{len(ready)}",
            "buffers": None,
        }
    finally:
        put_back(store.engine, held)
        store.release_leadership(holder)
    return results


def put_back(engine: sa.Engine, grants: Sequence[Any]) -> None:
    """Leased (or started) tasks back to exactly what they were before ``lease_many``:
    queued, attempt one less, their attempt row gone."""
    if not grants:
        return
    ids = [str(g.task_id) for g in grants]
    attempts = [g.attempt for g in grants]
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "DELETE FROM task_attempts a USING unnest(CAST(:ids AS uuid[]),"
                " CAST(:attempts AS int[])) AS b(id, attempt)"
                " WHERE a.task_id = b.id AND a.attempt = b.attempt"
            ),
            {"ids": ids, "attempts": attempts},
        )
        connection.execute(
            sa.text(
                "UPDATE tasks SET status = 'queued', lease_id = NULL, node_id = NULL,"
                " leased_at = NULL, started_at = NULL, lease_expires_at = NULL, epoch = NULL,"
                " attempt = attempt - 1"
                " WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('leased', 'running')"
            ),
            {"ids": ids},
        )


# -- the real loop ----------------------------------------------------------------------------


def run_loop(
    scheduler: Any,
    seconds: float,
    max_passes: int,
    refill: Refill,
    *,
    until_finished: int = 0,
    limit_s: float = 0.0,
) -> dict[str, Any]:
    """``scheduler.tick()`` back to back for ``seconds`` (or ``max_passes``), each timed;
    5 ms of sleep after a pass that dispatched nothing (``run()`` would wait for a lane to
    end there). With ``until_finished``, also until that many tasks were collected (at
    most ``limit_s``): the warm-up, which waits for Ray's first worker processes."""
    passes: list[tuple[float, int]] = []
    dispatched = lanes = finished = 0
    began = time.monotonic()

    def going() -> bool:
        elapsed = time.monotonic() - began
        if len(passes) >= max_passes:
            return False
        if elapsed < seconds:
            return True
        return finished < until_finished and elapsed < limit_s

    while going():
        pass_began = time.perf_counter()
        report = scheduler.tick()
        passes.append((time.perf_counter() - pass_began, report.dispatched))
        dispatched += report.dispatched
        lanes += report.lanes
        finished += report.finished
        refill.after_pass(report.dispatched)
        if not report.dispatched:
            time.sleep(0.005)
    return {
        "passes": passes,
        "dispatched": dispatched,
        "lanes": lanes,
        "finished": finished,
    }


def drain(scheduler: Any, timeout_s: float = 60.0) -> None:
    """Wait for the lanes in flight to end and collect them; dispatch nothing new."""
    import ray

    refs = list(scheduler.lanes)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    scheduler._collect_finished()


def measure_loop(url: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    from taskray.scheduler.core import Scheduler, SchedulerConfig
    from taskray.store import Store

    store = Store.open(url, migrate=False, relaxed_commits=True)
    refill_engine = sa.create_engine(
        sa.make_url(url).set(drivername="postgresql+psycopg"), poolclass=sa.NullPool
    )
    try:
        with RssSampler() as sampler:
            rss_before = rss()
            scheduler = Scheduler(store, url, SchedulerConfig())
            refill = Refill(refill_engine, size)
            began_warmup = time.monotonic()
            warmup = run_loop(
                scheduler,
                args.warmup_s,
                10**9,
                refill,
                until_finished=WARMUP_TASKS,
                limit_s=WARMUP_LIMIT_S,
            )
            if warmup["finished"] < WARMUP_TASKS:
                raise RuntimeError(
                    f"warm-up: only {warmup['finished']} tasks ended in {WARMUP_LIMIT_S:g}s"
                )
            with store.engine.connect() as connection:
                t0 = connection.execute(sa.text("SELECT now()")).scalar_one()
            warmup_s = time.monotonic() - began_warmup
            log(
                f"warm-up: {warmup_s:.1f}s, {len(warmup['passes'])} passes, "
                f"{warmup['dispatched']} dispatched, {warmup['finished']} collected"
            )
            sampler.reset()
            peak_before_measure = rss()
            refill.seconds = 0.0
            began = time.monotonic()
            loop = run_loop(scheduler, args.loop_s, args.passes, refill)
            wall = time.monotonic() - began
            peak = sampler.peak
            rss_after_loop = rss()
            log(
                f"loop: {wall:.1f}s, {len(loop['passes'])} passes, {loop['dispatched']} "
                f"dispatched, {loop['finished']} collected; draining {len(scheduler.lanes)} lanes"
            )
            drain(scheduler)
            scheduler.resign()
        with store.engine.connect() as connection:
            committed = connection.execute(
                sa.text(
                    "SELECT count(*) FROM tasks WHERE status = 'succeeded' AND completed_at >= :t0"
                ),
                {"t0": t0},
            ).scalar_one()
            queued = connection.execute(
                sa.text("SELECT count(*) FROM tasks WHERE status = 'queued'")
            ).scalar_one()
            bad = dict(
                connection.execute(
                    sa.text(
                        "SELECT status, count(*) FROM tasks WHERE status NOT IN"
                        " ('queued', 'succeeded') GROUP BY status"
                    )
                ).all()
            )
    finally:
        refill_engine.dispose()
        store.close()
    seconds = [s for s, _ in loop["passes"]]
    busy = [s for s, d in loop["passes"] if d]
    return {
        "warmup_passes": len(warmup["passes"]),
        "warmup_s": warmup_s,
        "warmup_dispatched": warmup["dispatched"],
        "passes": len(seconds),
        "wall_s": wall,
        "pass_ms": [s * 1e3 for s in seconds],
        "busy_pass_ms": [s * 1e3 for s in busy],
        "dispatched": loop["dispatched"],
        "lanes": loop["lanes"],
        "finished": loop["finished"],
        "committed": int(committed),
        "queued_after": int(queued),
        "not_queued_or_succeeded_after": {k: int(v) for k, v in bad.items()},
        "refill_s": refill.seconds,
        "rss_before": rss_before,
        "rss_before_measure": peak_before_measure,
        "rss_after_loop": rss_after_loop,
        "rss_after_drain": rss(),
        "rss_peak_loop": peak,
        "durations": dict(scheduler.durations),
    }


# -- one size, in a child process -------------------------------------------------------------


def _interrupted(signum: int, _frame: Any) -> None:
    """SIGTERM as Ctrl-C: the ``finally`` blocks drop the database and stop Ray."""
    raise KeyboardInterrupt(f"signal {signum}")


def run_size(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, _interrupted)
    import bench.ray_env  # noqa: F401  (sets Ray's environment; must come before ray)

    # isort: split
    import ray

    from taskray.store import Store, create_engine, migrate
    from taskray.store.engine import normalise_url

    size = args.size
    out: dict[str, Any] = {"size": size, "rss_start": rss()}
    put_repo_on_pythonpath()
    ray_tmpdir = os.environ["RAY_TMPDIR"]
    began = time.monotonic()
    before_shutdown: list[psutil.Process] = []
    admin = sa.create_engine(
        normalise_url(args.admin_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    try:
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            include_dashboard=False,
            runtime_env=RUNTIME_ENV,
            logging_level="WARNING",
        )
        out["rss_after_ray_init"] = rss()
        with postgres_database(args.admin_url) as url:
            name = sa.make_url(url).database
            print(f"DATABASE {name}", flush=True)  # the parent drops it if we cannot
            engine = create_engine(url, poolclass=sa.NullPool)
            migrate(engine)
            engine.dispose()
            db_admin = sa.create_engine(
                normalise_url(url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
            )
            store = Store.open(url, migrate=False, relaxed_commits=True)
            try:
                log(f"size {size:,}: building the backlog")
                out["build"] = build_backlog(store, db_admin, size, args.build, args.chunk)
                log(
                    f"size {size:,}: built in {out['build']['queued_s']:.1f}s "
                    f"(+{out['build']['history_s']:.1f}s history, "
                    f"{out['build']['vacuum_s']:.1f}s VACUUM ANALYZE): {out['build']['how']}"
                )
                out["rss_after_build"] = rss()
                log(f"size {size:,}: timing the calls ({args.reps} reps each)")
                out["calls"] = measure_calls(store, args.reps)
            finally:
                store.close()
                db_admin.dispose()
            log(f"size {size:,}: the scheduler loop ({args.warmup_s:g}s warm-up, {args.loop_s:g}s)")
            out["loop"] = measure_loop(url, size, args)
            before_shutdown = ray_processes(ray_tmpdir)
            ray.shutdown()
    finally:
        if ray.is_initialized():
            before_shutdown = ray_processes(ray_tmpdir)
            ray.shutdown()
        out["ray_killed"] = ensure_ray_gone(before_shutdown, ray_tmpdir)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        admin.dispose()
    out["peak_rss_process"] = peak_rss()
    out["wall_s"] = time.monotonic() - began
    Path(args.json_out).write_text(json.dumps(out, default=str))


# -- the parent: one child per size, then the table -------------------------------------------


def stat(values: Sequence[float]) -> tuple[float, float]:
    return percentile(values, 50), percentile(values, 95)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or a <= 0:
        return "n/a"
    return f"{b / a:.2f}x"


def render(results: list[dict[str, Any]]) -> tuple[str, list[str], list[str]]:
    """The table; the operations whose database work grows with the backlog (buffers up
    more than GROWS_BUFFERS times and more than the rows they return explain); those only
    slower by the clock (more than GROWS_TIME times at the median)."""
    first, last = results[0], results[-1]
    header = ["operation"]
    for r in results:
        header += [f"{r['size']:,}: p50 ms", "p95 ms", "rows", "buffers", "db ms"]
    header += [f"p50 {last['size']:,}/{first['size']:,}", "buffers"]
    rows = []
    growing: list[str] = []
    slower: list[str] = []
    for name in first["calls"]:
        row: list[object] = [name]
        for r in results:
            call = r["calls"][name]
            p50, p95 = stat(call["ms"])
            buffers = call.get("buffers")
            row += [
                fmt(p50, 2),
                fmt(p95, 2),
                call["rows"],
                "-" if buffers is None else buffers,
                "-" if buffers is None else fmt(call["exec_ms"], 2),
            ]
        a, b = first["calls"][name], last["calls"][name]
        time_ratio = stat(b["ms"])[0] / stat(a["ms"])[0]
        row.append(ratio(stat(a["ms"])[0], stat(b["ms"])[0]))
        buffers_grow = False
        if a.get("buffers") and b.get("buffers") is not None:
            row.append(ratio(a["buffers"], b["buffers"]))
            returned = b["rows"] if isinstance(b["rows"], int) else 0
            buffers_grow = (
                b["buffers"] > GROWS_BUFFERS * a["buffers"]
                and b["buffers"] > BUFFERS_PER_ROW * returned + 50
            )
        else:
            row.append("-")
        if buffers_grow:
            growing.append(name)
        elif time_ratio > GROWS_TIME:
            slower.append(name)
        rows.append(row)
    for label, key in (
        ("scheduler pass (all)", "pass_ms"),
        ("scheduler pass (dispatching)", "busy_pass_ms"),
    ):
        row = [label]
        for r in results:
            values = r["loop"][key]
            p50, p95 = stat(values)
            row += [fmt(p50, 2), fmt(p95, 2), len(values), "-", "-"]
        a = stat(first["loop"][key])[0]
        b = stat(last["loop"][key])[0]
        row += [ratio(a, b), "-"]
        if not math.isnan(a) and a > 0 and b / a > GROWS_TIME:
            slower.append(label)
        rows.append(row)
    return table(header, rows), growing, slower


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,1000000", help="queued backlogs, comma-separated")
    parser.add_argument("--reps", type=int, default=50, help="timed calls per operation")
    parser.add_argument("--build", choices=("auto", "submit", "sql"), default="auto")
    parser.add_argument("--chunk", type=int, default=20_000, help="rows per submit_many")
    parser.add_argument("--loop-s", type=float, default=20.0, help="timed scheduler loop")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="untimed loop first")
    parser.add_argument("--passes", type=int, default=10**9, help="stop the loop after these")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--num-gpus", type=int, default=1, help="logical GPUs Ray declares")
    parser.add_argument(
        "--admin-url", default=os.environ.get("TASKRAY_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument(
        "--report-from", type=Path, help="print the report of an earlier run's --json file"
    )
    args = parser.parse_args(argv)
    if args.report_from is not None:
        report(json.loads(args.report_from.read_text()), args, math.nan)
        return
    if args.size is not None:
        run_size(args)
        return

    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    began = time.monotonic()
    results: list[dict[str, Any]] = []
    workdir = tempfile.mkdtemp(prefix="trb-scale-")
    child: subprocess.Popen[str] | None = None

    signal.signal(signal.SIGTERM, _interrupted)
    try:
        for size in sizes:
            out = Path(workdir, f"{size}.json")
            command = [sys.executable, __file__, "--size", str(size), "--json-out", str(out)]
            for flag in (
                "reps",
                "build",
                "chunk",
                "loop_s",
                "warmup_s",
                "passes",
                "num_cpus",
                "num_gpus",
                "admin_url",
            ):
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            log(f"size {size:,}: child process")
            child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
            database = None
            try:
                assert child.stdout is not None
                for line in child.stdout:
                    if line.startswith("DATABASE "):
                        database = line.split()[1]
                    else:
                        print(line, end="", flush=True)
                child.wait()
            except KeyboardInterrupt:
                # The child got Ctrl-C too (same process group), unless we were sent
                # SIGTERM alone: make sure it stops and cleans up, then drop what it left.
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                raise
            finally:
                if database is not None:
                    drop_leftover(args.admin_url, database)
            if child.returncode != 0:
                raise SystemExit(f"size {size:,}: the child failed (exit {child.returncode})")
            results.append(json.loads(out.read_text()))
    except KeyboardInterrupt:
        log("interrupted; databases dropped")
        raise SystemExit(130) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, args, time.monotonic() - began)


def drop_leftover(admin_url: str, database: str) -> None:
    from taskray.store.engine import normalise_url

    admin = sa.create_engine(
        normalise_url(admin_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        admin.dispose()


def report(results: list[dict[str, Any]], args: argparse.Namespace, wall_s: float) -> None:
    if args.json and args.report_from is None:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"figures written to {args.json}")
    print()
    for r in results:
        b = r["build"]
        counts = ", ".join(f"{k} {v:,}" for k, v in sorted(b["counts"].items()))
        print(
            f"backlog {r['size']:,}: {b['how']}; queued in {b['queued_s']:.1f}s, history in "
            f"{b['history_s']:.1f}s, VACUUM ANALYZE {b['vacuum_s']:.1f}s; rows: {counts}"
        )
        print(
            "  on disk (MiB): "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(b["relation_mib"].items()))
        )
    print()
    text, growing, slower = render(results)
    print(
        f"calls: median and p95 of {args.reps} (after 3 untimed), with {HELD_LIVE} tasks live; "
        "buffers: shared buffers its SQL touched (EXPLAIN ANALYZE BUFFERS, one call); db ms: "
        "its execution time in the server; for the passes, rows is how many passes"
    )
    print(text)
    print()
    for r in results:
        loop = r["loop"]
        print(
            f"loop {r['size']:,}: warm-up {loop['warmup_s']:.0f}s ({loop['warmup_dispatched']:,} "
            f"dispatched); {loop['passes']} passes in {loop['wall_s']:.1f}s "
            f"({len(loop['busy_pass_ms'])} dispatching), {loop['dispatched']:,} dispatched in "
            f"{loop['lanes']:,} lanes ({loop['dispatched'] / loop['wall_s']:.0f}/s), "
            f"{loop['finished']:,} collected, {loop['committed']:,} committed; "
            f"pass max {fmt(max(loop['pass_ms'], default=math.nan), 1)} ms; refill "
            f"{loop['refill_s']:.1f}s outside the passes; queued after {loop['queued_after']:,}; "
            f"other states after {loop['not_queued_or_succeeded_after'] or 'none'}"
        )
    print()
    for r in results:
        loop = r["loop"]
        print(
            f"RSS {r['size']:,}: start {r['rss_start'] / MIB:.0f} MiB, after ray.init "
            f"{r['rss_after_ray_init'] / MIB:.0f}, after build+calls "
            f"{r['rss_after_build'] / MIB:.0f}; loop: before {loop['rss_before'] / MIB:.0f}, "
            f"after warm-up {loop['rss_before_measure'] / MIB:.0f}, after "
            f"{loop['rss_after_loop'] / MIB:.0f} (growth "
            f"{(loop['rss_after_loop'] - loop['rss_before']) / MIB:+.1f}), peak during the loop "
            f"{loop['rss_peak_loop'] / MIB:.0f}, after drain {loop['rss_after_drain'] / MIB:.0f}; "
            f"process peak (VmHWM) {r['peak_rss_process'] / MIB:.0f} MiB"
        )
    print()
    last = results[-1]
    for title, names in (
        (
            f"database work grows with the backlog (buffers > {GROWS_BUFFERS:g}x and > "
            f"{BUFFERS_PER_ROW} a row returned); plan at {last['size']:,}:",
            growing,
        ),
        (
            f"slower by the clock only (p50 > {GROWS_TIME:g}x, buffers flat: noise or Python "
            f"work, see db ms); plan at {last['size']:,}:",
            slower,
        ),
    ):
        if not names:
            continue
        print(title)
        for name in names:
            print(f"  {name}")
            for plan in last["calls"].get(name, {}).get("plans", []):
                print("    " + plan.replace("\n", "\n    "))
    if not growing and not slower:
        print("no operation grows with the backlog")
    print(
        f"# total {wall_s:.0f}s; {os.cpu_count()} cores shared with others' work: the "
        "millisecond figures are noisy, the buffer counts are not"
    )


if __name__ == "__main__":
    main()
