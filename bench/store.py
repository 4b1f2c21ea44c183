"""Store benchmarks: PostgreSQL and SQLite side by side, in one run.

    .venv/bin/python bench/store.py                      # both backends, default sizes
    .venv/bin/python bench/store.py --quick              # a smoke run in seconds
    .venv/bin/python bench/store.py --backend postgresql --sizes 10k,100k,1M

Three measurements, each on a fresh database of its own:

1. submit: ``submit_many`` in batches of 1,000 and 5,000 rows against one ``submit()``
   call per task (the baseline);
2. lease + complete, one process: ``claim(batch)`` then ``start`` + ``complete`` per task,
   against ``claim(1)`` per task (the baseline);
3. the claim path against table size: ``candidates(100)`` and ``claim(10)`` with 1,000
   ready rows beside 10k, 100k and 1M finished (succeeded) rows, and PostgreSQL's
   ``EXPLAIN (ANALYZE)`` of the candidate query, which should be an index scan on the
   partial index ``ix_tasks_ready`` whatever the number of finished rows.

The bench creates uniquely named PostgreSQL databases (dropped at the end, also on error
or Ctrl-C) and SQLite files in a temporary directory. PostgreSQL is reached through
``--pg-url`` (default ``TASKRAY_TEST_DATABASE_URL`` or the local server, user postgres).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, make_url

from taskray.models import RetryPolicy, TaskSpec, TaskState
from taskray.store import Store
from taskray.store.tables import tasks

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
READY_ROWS = 1_000
READY_INDEX = "ix_tasks_ready"
#: Above this many finished rows, SQLite is skipped unless --sqlite-max-finished says more.
DEFAULT_SQLITE_MAX_FINISHED = 1_000_000


# -- backends -------------------------------------------------------------------------------


class Backend:
    """Hands out fresh, migrated databases of one kind and removes them at the end."""

    name: str

    def fresh_url(self) -> str:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Postgres(Backend):
    name = "postgresql"

    def __init__(self, admin_url: str) -> None:
        url = make_url(admin_url)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        self.admin_url: URL = url
        self.admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        self.created: list[str] = []
        self._server_version = self._scalar("SHOW server_version")

    def _scalar(self, sql: str) -> Any:
        with self.admin.connect() as connection:
            return connection.exec_driver_sql(sql).scalar()

    def _execute(self, sql: str) -> None:
        with self.admin.connect() as connection:
            connection.exec_driver_sql(sql)

    def fresh_url(self) -> str:
        name = f"taskray_bench_{uuid.uuid4().hex[:12]}"
        self.created.append(name)  # first: dropped at the end even if CREATE fails halfway
        self._execute(f'CREATE DATABASE "{name}"')
        url = self.admin_url.set(database=name).render_as_string(hide_password=False)
        Store.open(url).close()  # migrate
        return url

    def version(self) -> str:
        return f"PostgreSQL {self._server_version}"

    def close(self) -> None:
        errors = []
        for name in reversed(self.created):
            try:
                self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except sa.exc.SQLAlchemyError as exc:  # keep dropping the others
                errors.append(f"{name}: {exc}")
        self.created.clear()
        self.admin.dispose()
        for error in errors:
            print(f"warning: could not drop database {error}", file=sys.stderr)


class Sqlite(Backend):
    name = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    def fresh_url(self) -> str:
        self.count += 1
        url = f"sqlite:///{self.directory / f'bench-{self.count}.db'}"
        Store.open(url).close()  # migrate
        return url

    def version(self) -> str:
        return f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=NORMAL)"

    def close(self) -> None:
        pass  # the temporary directory goes with the ExitStack


@contextmanager
def open_store(url: str) -> Iterator[Store]:
    store = Store.open(url, migrate=False)
    try:
        yield store
    finally:
        store.close()


# -- helpers --------------------------------------------------------------------------------


def spec(n: int) -> TaskSpec:
    return TaskSpec(type="bench:noop", payload={"n": n}, retry=RetryPolicy(max_retries=0))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000.0


def p90_ms(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000.0


def parse_size(text: str) -> int:
    text = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def human(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return f"{n:,}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n== {title} ==")
    line = "  ".join(
        str(h).ljust(widths[i]) if i == 0 else str(h).rjust(widths[i]) for i, h in enumerate(header)
    )
    print(line)
    print("-" * len(line))
    for row in rows:
        print(
            "  ".join(
                str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
                for i, c in enumerate(row)
            )
        )


@dataclass
class Results:
    """Numbers per backend, keyed by row label."""

    backends: list[str]
    values: dict[str, dict[str, str]] = field(default_factory=dict)

    def put(self, label: str, backend: str, value: str) -> None:
        self.values.setdefault(label, {})[backend] = value

    def rows(self) -> list[list[str]]:
        return [
            [label, *(v.get(b, "-") for b in self.backends)] for label, v in self.values.items()
        ]


# -- 1. submit ------------------------------------------------------------------------------


def bench_submit(
    store: Store, backend: str, out: Results, singles: int, batch_sizes: list[int], rows: int
) -> None:
    specs = [spec(i) for i in range(singles)]

    def one_by_one() -> None:
        for s in specs:
            store.submit(s)

    elapsed = timed(one_by_one)
    out.put(
        f"submit() x {singles:,}, one call per task (baseline)",
        backend,
        f"{singles / elapsed:,.0f}",
    )
    for size in batch_sizes:
        batches = [[spec(i) for i in range(size)] for _ in range(max(2, rows // size))]

        def all_batches(batches: list[list[TaskSpec]] = batches) -> None:
            for batch in batches:
                store.submit_many(batch)

        elapsed = timed(all_batches)
        total = sum(len(b) for b in batches)
        out.put(
            f"submit_many(), batches of {size:,} ({len(batches)} x)",
            backend,
            f"{total / elapsed:,.0f}",
        )


# -- 2. lease + complete ----------------------------------------------------------------------


def drain(store: Store, batch: int) -> tuple[int, float, list[float], list[float], list[float]]:
    """Claim ``batch`` at a time and run each task to completion until the queue is empty."""
    claims: list[float] = []
    starts: list[float] = []
    completes: list[float] = []
    done = 0
    began = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        leases = store.claim(batch, node_id="bench")
        claims.append(time.perf_counter() - t0)
        if not leases:
            break
        for lease in leases:
            t1 = time.perf_counter()
            store.start(lease.task.id, lease.lease_id, worker_id="bench-0")
            t2 = time.perf_counter()
            store.complete(lease.task.id, lease.lease_id, {"ok": True})
            t3 = time.perf_counter()
            starts.append(t2 - t1)
            completes.append(t3 - t2)
            done += 1
    return done, time.perf_counter() - began, claims, starts, completes


def bench_lease(
    store: Store, backend: str, out: Results, baseline_n: int, n: int, batch: int
) -> None:
    for label, count, size in (
        (f"claim(1) per task, {baseline_n:,} tasks (baseline)", baseline_n, 1),
        (f"claim({batch}) per batch, {n:,} tasks", n, batch),
    ):
        store.submit_many(spec(i) for i in range(count))
        done, elapsed, claims, starts, completes = drain(store, size)
        assert done == count, (done, count)
        out.put(f"{label}: tasks/s", backend, f"{done / elapsed:,.0f}")
        out.put(f"  claim({size}) call, median ms", backend, f"{median_ms(claims[:-1]):.2f}")
        out.put(f"  start, median ms (claim({size}) run)", backend, f"{median_ms(starts):.2f}")
        out.put(
            f"  complete, median ms (claim({size}) run)", backend, f"{median_ms(completes):.2f}"
        )


# -- 3. claim path vs finished rows -----------------------------------------------------------

# The bench fills its fixtures directly with SQL, for speed: a million rows through
# submit_many would take minutes and measure submit, not the claim path. The rows are
# what the store would have left behind for finished tasks (status 'succeeded', times in
# the past, attempt 1); their attempt rows are left out, as the claim path never reads them.
_COLUMNS = (
    "id, tenant, queue, type, payload, status, priority, attempt, max_retries, "
    "replayed_attempts, backoff_base_s, backoff_cap_s, backoff_jitter, created_at, "
    "scheduled_at, leased_at, started_at, completed_at, lease_id, node_id, num_cpus, num_gpus, "
    "memory_bytes, pending_upstreams, result"
)

_PG_FILL = f"""
INSERT INTO tasks ({_COLUMNS})
SELECT gen_random_uuid(), 'default', 'default', 'bench:finished', jsonb_build_object('n', g),
       'succeeded', g % 10, 1, 0, 0, 1.0, 300.0, 0.5,
       now() - make_interval(secs => g), now() - make_interval(secs => g),
       now() - make_interval(secs => g - 1), now() - make_interval(secs => g - 1),
       now() - make_interval(secs => g - 2), gen_random_uuid(), 'bench', 1.0, 0.0, 0, 0,
       '{{"ok": true}}'::jsonb
FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g
"""

# SQLite stores UUIDs as 32 hex digits and times as naive UTC text with six decimals,
# the format the store's column types write (see taskray/store/tables.py).
_SQLITE_TIME = "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || (n - {k}) || ' seconds') || '000'"
_SQLITE_FILL = f"""
WITH RECURSIVE g(n) AS (
    SELECT :first UNION ALL SELECT n + 1 FROM g WHERE n < :last
)
INSERT INTO tasks ({_COLUMNS})
SELECT lower(hex(randomblob(16))), 'default', 'default', 'bench:finished',
       json_object('n', n), 'succeeded', n % 10, 1, 0, 0, 1.0, 300.0, 0.5,
       {_SQLITE_TIME.format(k=0)}, {_SQLITE_TIME.format(k=0)},
       {_SQLITE_TIME.format(k=1)}, {_SQLITE_TIME.format(k=1)}, {_SQLITE_TIME.format(k=2)},
       lower(hex(randomblob(16))), 'bench', 1.0, 0.0, 0, 0, '{{"ok": true}}'
FROM g
"""

# claim(10) leaves leased rows behind; put them back so each size starts with 1,000 ready.
_PUT_BACK = (
    "UPDATE tasks SET status = 'queued', attempt = 0, lease_id = NULL, leased_at = NULL, "
    "lease_expires_at = NULL, node_id = NULL, epoch = NULL WHERE status = 'leased'",
    "DELETE FROM task_attempts",
)


def fill_finished(store: Store, first: int, last: int) -> None:
    with store.engine.begin() as connection:
        sql = _PG_FILL if store.is_postgres else _SQLITE_FILL
        connection.execute(sa.text(sql), {"first": first, "last": last})
    with store.engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE tasks" if store.is_postgres else "ANALYZE")


def put_back(store: Store) -> None:
    with store.engine.begin() as connection:
        for sql in _PUT_BACK:
            connection.exec_driver_sql(sql)


def candidate_sql(store: Store, connection: Connection, *, claim: bool) -> str:
    """The store's own candidate (or claim) query, compiled with its parameters inline."""
    now = store.clock.now(connection)
    if claim:
        query = store._ready(now, None).with_only_columns(tasks.c.id).limit(10)
        if store.is_postgres:
            query = query.with_for_update(skip_locked=True)
    else:
        query = store._ready(now, None).limit(100)
    return str(query.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}))


def _plan_nodes(node: dict[str, Any]) -> Iterator[str]:
    name = node["Node Type"]
    if "Index Name" in node:
        name += f" using {node['Index Name']}"
    elif "Relation Name" in node:
        name += f" on {node['Relation Name']}"
    yield name
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


@dataclass
class Plan:
    summary: str
    text: str
    uses_ready_index: bool
    execution_ms: float | None


def explain(store: Store, *, claim: bool) -> Plan:
    """EXPLAIN (ANALYZE) on PostgreSQL, EXPLAIN QUERY PLAN on SQLite; nothing is committed."""
    with store.engine.connect() as connection:
        sql = candidate_sql(store, connection, claim=claim)
        if store.is_postgres:
            raw = connection.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql
            ).scalar_one()
            document = (json.loads(raw) if isinstance(raw, str) else raw)[0]
            text = "\n".join(
                connection.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + sql).scalars()
            )
            nodes = list(_plan_nodes(document["Plan"]))
            connection.rollback()  # the claim query locked rows: let them go
            return Plan(
                summary=" -> ".join(nodes),
                text=text,
                uses_ready_index=any(f"Index Scan using {READY_INDEX}" in n for n in nodes),
                execution_ms=float(document["Execution Time"]),
            )
        rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql).all()
        details = [str(row[-1]) for row in rows]
        connection.rollback()
        return Plan(
            summary="; ".join(details),
            text="\n".join(details),
            uses_ready_index=any(f"USING INDEX {READY_INDEX}" in d for d in details),
            execution_ms=None,
        )


def bench_claim_path(
    store: Store, backend: str, sizes: list[int], reps: int, out: Results, plans: dict[str, Any]
) -> None:
    store.submit_many(spec(i) for i in range(READY_ROWS))
    filled = 0
    for size in sizes:
        fill_s = timed(lambda size=size, filled=filled: fill_finished(store, filled + 1, size))
        filled = size
        for _ in range(3):  # warm the cache and the connection pool
            store.candidates(100)
        reads = [timed(lambda: store.candidates(100)) for _ in range(reps)]
        claims = []
        for _ in range(reps):
            claims.append(timed(lambda: store.claim(10, node_id="bench")))
        put_back(store)
        counts = store.count_by_status()
        assert counts.get(TaskState.QUEUED, 0) == READY_ROWS, counts
        plan = explain(store, claim=False)
        claim_plan = explain(store, claim=True)
        key = human(size)
        out.put(f"{key} finished: fill (s)", backend, f"{fill_s:.1f}")
        out.put(
            f"{key} finished: candidates(100) median / p90 ms",
            backend,
            f"{median_ms(reads):.2f} / {p90_ms(reads):.2f}",
        )
        out.put(
            f"{key} finished: claim(10) median / p90 ms",
            backend,
            f"{median_ms(claims):.2f} / {p90_ms(claims):.2f}",
        )
        if plan.execution_ms is not None:
            out.put(
                f"{key} finished: candidate query execution ms", backend, f"{plan.execution_ms:.3f}"
            )
        out.put(
            f"{key} finished: index scan on {READY_INDEX}",
            backend,
            "yes" if plan.uses_ready_index and claim_plan.uses_ready_index else "NO",
        )
        plans.setdefault(backend, []).append((size, plan, claim_plan))


# -- driver ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the taskray store on PostgreSQL and SQLite side by side."
    )
    parser.add_argument(
        "--backend", choices=("postgresql", "sqlite", "both"), default="both", help="default: both"
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="finished-row counts for the claim-path table, e.g. 10k,100k,1M (the default; "
        "--quick: 10k,100k)",
    )
    parser.add_argument(
        "--sqlite-max-finished",
        type=parse_size,
        default=DEFAULT_SQLITE_MAX_FINISHED,
        help="skip claim-path sizes above this on SQLite (default 1M, i.e. none skipped)",
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("TASKRAY_TEST_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="PostgreSQL admin URL; the bench creates and drops its own databases there",
    )
    parser.add_argument("--no-plan", action="store_true", help="do not print the full plans")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sorted(
        parse_size(s)
        for s in (args.sizes or ("10k,100k" if args.quick else "10k,100k,1M")).split(",")
    )
    q = args.quick
    singles, submit_rows = (200, 5_000) if q else (1_000, 20_000)
    baseline_n, lease_n, lease_batch = (200, 1_000, 50) if q else (1_000, 5_000, 50)
    reps = 20 if q else 50
    names = ["postgresql", "sqlite"] if args.backend == "both" else [args.backend]

    started = time.perf_counter()
    with ExitStack() as stack:
        backends: list[Backend] = []
        for name in names:
            if name == "postgresql":
                try:
                    pg = Postgres(args.pg_url)
                except sa.exc.OperationalError as exc:
                    where = make_url(args.pg_url).render_as_string(hide_password=True)
                    print(
                        f"PostgreSQL is not reachable at {where}: "
                        f"{type(exc.orig).__name__}; use --backend sqlite",
                        file=sys.stderr,
                    )
                    return 2
                stack.callback(pg.close)
                backends.append(pg)
            else:
                directory = Path(
                    stack.enter_context(tempfile.TemporaryDirectory(prefix="taskray-bench-"))
                )
                backends.append(Sqlite(directory))

        print("taskray store benchmark")
        print(
            f"python {platform.python_version()}, SQLAlchemy {sa.__version__}, "
            f"{os.cpu_count()} CPUs, {platform.platform()}"
        )
        for backend in backends:
            print(f"{backend.name}: {backend.version()}")

        submit = Results(names)
        lease = Results(names)
        claim = Results(names)
        plans: dict[str, list[tuple[int, Plan, Plan]]] = {}
        skipped: list[str] = []
        for backend in backends:
            with open_store(backend.fresh_url()) as store:
                bench_submit(store, backend.name, submit, singles, [1_000, 5_000], submit_rows)
            with open_store(backend.fresh_url()) as store:
                bench_lease(store, backend.name, lease, baseline_n, lease_n, lease_batch)
            backend_sizes = sizes
            if backend.name == "sqlite":
                backend_sizes = [s for s in sizes if s <= args.sqlite_max_finished]
                skipped += [
                    f"sqlite at {human(s)} finished rows" for s in sizes if s not in backend_sizes
                ]
            with open_store(backend.fresh_url()) as store:
                bench_claim_path(store, backend.name, backend_sizes, reps, claim, plans)

        print_table("submit throughput, rows/s (higher is better)", ["", *names], submit.rows())
        print_table(
            "lease + complete, one process: claim(batch), then start + complete per task",
            ["", *names],
            lease.rows(),
        )
        print_table(
            f"claim path: {READY_ROWS:,} ready rows beside N finished rows "
            f"({reps} calls each; ANALYZE after each fill)",
            ["", *names],
            claim.rows(),
        )
        if skipped:
            print("skipped (over --sqlite-max-finished): " + ", ".join(skipped))

        for backend_name, entries in plans.items():
            print(f"\n== {backend_name}: plan of the candidate query, per size ==")
            for size, plan, claim_plan in entries:
                print(f"{human(size):>5} finished  candidates(100): {plan.summary}")
                print(f"{'':>5}           claim(10):        {claim_plan.summary}")
            if not args.no_plan and entries:
                size, plan, claim_plan = entries[-1]
                label = (
                    "EXPLAIN (ANALYZE, BUFFERS)"
                    if backend_name == "postgresql"
                    else "EXPLAIN QUERY PLAN"
                )
                print(f"\n{label} of candidates(100) at {human(size)} finished rows:")
                print(plan.text)
                print(f"\n{label} of claim(10) at {human(size)} finished rows:")
                print(claim_plan.text)
            bad = [
                human(s) for s, p, c in entries if not (p.uses_ready_index and c.uses_ready_index)
            ]
            if bad:
                print(f"WARNING: {backend_name} did not use {READY_INDEX} at {', '.join(bad)}")

    print(f"\ntotal time {time.perf_counter() - started:.0f}s; databases and files removed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # The ExitStack in main() has dropped the databases and removed the files by now.
        print("\ninterrupted; databases and files removed", file=sys.stderr)
        sys.exit(130)
