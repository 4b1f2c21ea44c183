"""Worker processes racing on one PostgreSQL store: every result commits exactly once.

Four worker processes claim, start and complete 5,000 tasks concurrently. Two take
the executor's batched path (``start_many`` / ``complete_many`` on a store with
relaxed commits, a whole claim per statement, the fence per row); the other two
commit one task at a time, and each of their completions also inserts a row into a
sink table inside the completing transaction (the handler's own write, DESIGN
invariant 2). A reaper process expires leases
while they run: some claims take a short lease TTL, so their leases run out, are
reaped, and the tasks are leased again elsewhere; the stale holder's start or
complete must then be refused with ``LeaseLostError`` and write nothing.

Time is the database clock throughout (no FakeClock: the processes share only the
server). Nothing waits for a fixed time to let something happen: the parent joins the
processes against a deadline, a stale holder tries its complete only once every task
has finished (which proves its lease was reaped and the task re-leased), and an idle
worker's short poll interval only paces its queries.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from taskray.errors import LeaseLostError
from taskray.models import Lease, RetryPolicy, Success, TaskState
from taskray.store import Store
from taskray.testing import make_spec

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

N_TASKS = 5_000
N_WORKERS = 4
BATCH = 20
#: Every SHORT_EVERY-th claim of a worker takes a lease that runs out mid-batch.
SHORT_EVERY = 10
SHORT_TTL_S = 0.1
#: At start each worker claims and starts DOOMED tasks on a short lease and sits on them
#: until every task has finished; completing them then must be refused.
DOOMED = 3
DOOMED_TTL_S = 1.0
REAP_EVERY_S = 0.05
#: A worker with nothing to claim while other tasks are still leased polls this often.
IDLE_POLL_S = 0.01
#: Hard bound on the whole run; it normally takes well under half of this.
RUN_DEADLINE_S = 300.0

#: Retries without backoff: a reaped task is ready again at once, and never dead-letters.
NO_BACKOFF = RetryPolicy(max_retries=1000, backoff_base_s=0.0, backoff_cap_s=0.0, jitter=0.0)

sink_metadata = sa.MetaData()
#: The exactly-once sink. No unique constraint on task_id: a duplicate must be counted
#: by the test, not turned into an error inside the worker.
sink = sa.Table(
    "exactly_once_sink",
    sink_metadata,
    sa.Column("seq", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("task_id", sa.Uuid, nullable=False),
    sa.Column("worker", sa.String(50), nullable=False),
)

UNFINISHED = (TaskState.BLOCKED, TaskState.QUEUED, TaskState.LEASED, TaskState.RUNNING)


def _sink_write(task_id: uuid.UUID, worker: str) -> Any:
    def write(connection: Connection) -> None:
        connection.execute(sink.insert().values(task_id=task_id, worker=worker))

    return write


def _all_finished(store: Store) -> bool:
    counts = store.count_by_status()
    return not any(counts.get(state, 0) for state in UNFINISHED)


def _batched(worker: str) -> bool:
    """Even-numbered workers take the batched path."""
    return int(worker.rsplit("-", 1)[1]) % 2 == 0


def _work(url: str, worker: str, out: str, budget_s: float) -> None:
    """One worker process: claim, start, complete until every task has finished."""
    if _batched(worker):
        _work_batched(url, worker, out, budget_s)
        return
    deadline = time.monotonic() + budget_s
    report: dict[str, Any] = {
        "worker": worker,
        "done": [],
        "leases": 0,
        "lost_at_start": 0,
        "lost_at_complete": 0,
        "stale_commits": 0,
    }
    done: list[str] = report["done"]
    store = Store.open(url, migrate=False)
    try:
        # Deterministic fencing: these leases run out while their holder sits on them; the
        # reaper takes them back and other workers (or this one) run the tasks. Their
        # completes are tried once every task has finished, so each must be refused.
        doomed = store.claim(DOOMED, node_id=worker, ttl_s=DOOMED_TTL_S)
        report["leases"] += len(doomed)
        stale: list[Lease] = []
        for lease in doomed:
            try:
                store.start(lease.task.id, lease.lease_id, worker_id=worker)
                stale.append(lease)
            except LeaseLostError:
                report["lost_at_start"] += 1

        claims = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker} still had work at its deadline")
            claims += 1
            ttl = SHORT_TTL_S if claims % SHORT_EVERY == 0 else None
            leases = store.claim(BATCH, node_id=worker, ttl_s=ttl)
            report["leases"] += len(leases)
            if not leases:
                if _all_finished(store):
                    break
                time.sleep(IDLE_POLL_S)  # the rest is leased elsewhere: poll again
                continue
            for lease in leases:
                task_id = lease.task.id
                try:
                    store.start(task_id, lease.lease_id, worker_id=worker)
                except LeaseLostError:
                    report["lost_at_start"] += 1
                    continue
                try:
                    store.complete(
                        task_id,
                        lease.lease_id,
                        result={"worker": worker},
                        write=_sink_write(task_id, worker),
                    )
                except LeaseLostError:
                    report["lost_at_complete"] += 1
                    continue
                done.append(str(task_id))

        for lease in stale:
            try:
                store.complete(
                    lease.task.id, lease.lease_id, write=_sink_write(lease.task.id, worker)
                )
            except LeaseLostError:
                report["lost_at_complete"] += 1
            else:
                report["stale_commits"] += 1
                done.append(str(lease.task.id))
    finally:
        store.close()
    Path(out).write_text(json.dumps(report))


def _work_batched(url: str, worker: str, out: str, budget_s: float) -> None:
    """A worker on the batched path: each claim started in one statement and completed in
    one, with relaxed commits (as the executors' node agents run)."""
    deadline = time.monotonic() + budget_s
    report: dict[str, Any] = {
        "worker": worker,
        "done": [],
        "leases": 0,
        "lost_at_start": 0,
        "lost_at_complete": 0,
        "stale_commits": 0,
    }
    done: list[str] = report["done"]
    store = Store.open(url, migrate=False, relaxed_commits=True)

    def pairs(leases: list[Lease]) -> list[tuple[uuid.UUID, uuid.UUID]]:
        return [(lease.task.id, lease.lease_id) for lease in leases]

    try:
        doomed = store.claim(DOOMED, node_id=worker, ttl_s=DOOMED_TTL_S)
        report["leases"] += len(doomed)
        started = store.start_many(pairs(doomed), worker_id=worker)
        report["lost_at_start"] += len(started.refused)
        stale = [lease for lease in doomed if lease.task.id not in set(started.refused)]
        claims = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker} still had work at its deadline")
            claims += 1
            ttl = SHORT_TTL_S if claims % SHORT_EVERY == 0 else None
            leases = store.claim(BATCH, node_id=worker, ttl_s=ttl)
            report["leases"] += len(leases)
            if not leases:
                if _all_finished(store):
                    break
                time.sleep(IDLE_POLL_S)  # the rest is leased elsewhere: poll again
                continue
            started = store.start_many(pairs(leases), worker_id=worker)
            report["lost_at_start"] += len(started.refused)
            lease_of = dict(pairs(leases))
            committed = store.complete_many(
                [Success(t.id, lease_of[t.id], {"worker": worker}) for t in started.tasks]
            )
            report["lost_at_complete"] += len(committed.refused)
            done.extend(str(task_id) for task_id in committed.committed)
        late = store.complete_many([Success(t, lease, None) for t, lease in pairs(stale)])
        report["lost_at_complete"] += len(late.refused)
        report["stale_commits"] += len(late.committed)
        done.extend(str(task_id) for task_id in late.committed)
    finally:
        store.close()
    Path(out).write_text(json.dumps(report))


def _reap(url: str, stop: Any, out: str) -> None:
    """The reaper process: expired leases go back to the queue until told to stop."""
    reaped = 0
    store = Store.open(url, migrate=False)
    try:
        while not stop.wait(REAP_EVERY_S):
            reaped += len(store.reap())
        reaped += len(store.reap())
    finally:
        store.close()
    Path(out).write_text(json.dumps({"reaped": reaped}))


def _scalar(connection: Connection, sql: str) -> Any:
    return connection.execute(sa.text(sql)).scalar_one()


def test_concurrent_workers_commit_every_task_exactly_once(postgres: Any, tmp_path: Path) -> None:
    url = postgres.create()
    store = Store.open(url, migrate=False)
    try:
        sink_metadata.create_all(store.engine)
        submitted = store.submit_many(
            make_spec("tests:exactly-once", payload={"n": i}, retry=NO_BACKOFF)
            for i in range(N_TASKS)
        )
        all_ids = {str(r.task.id) for r in submitted}
        assert len(all_ids) == N_TASKS

        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        reaper_out = tmp_path / "reaper.json"
        reaper = context.Process(
            target=_reap, args=(url, stop, str(reaper_out)), name="reaper", daemon=True
        )
        names = [f"worker-{i}" for i in range(N_WORKERS)]
        outs = {name: tmp_path / f"{name}.json" for name in names}
        workers = [
            context.Process(
                target=_work,
                args=(url, name, str(outs[name]), RUN_DEADLINE_S),
                name=name,
                daemon=True,
            )
            for name in names
        ]
        processes = [reaper, *workers]
        started_at = time.monotonic()
        deadline = started_at + RUN_DEADLINE_S + 10.0
        try:
            for process in processes:
                process.start()
            for process in workers:
                process.join(max(0.0, deadline - time.monotonic()))
            stop.set()
            reaper.join(max(5.0, deadline - time.monotonic()))
            hung = [p.name for p in processes if p.is_alive()]
            assert not hung, f"still running at the deadline: {hung}"
            failed = {p.name: p.exitcode for p in processes if p.exitcode != 0}
            assert not failed, f"processes failed (see their tracebacks above): {failed}"
        finally:
            stop.set()
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join(5.0)
        elapsed = time.monotonic() - started_at

        reports = {name: json.loads(outs[name].read_text()) for name in names}
        reaped = json.loads(reaper_out.read_text())["reaped"]

        # Every task succeeded, and nothing else happened to any of them.
        assert store.count_by_status() == {TaskState.SUCCEEDED: N_TASKS}

        done = {name: set(report["done"]) for name, report in reports.items()}
        by_sink_workers = set().union(*(ids for name, ids in done.items() if not _batched(name)))
        with store.engine.connect() as connection:
            # The sink (workers committing one at a time): one row per task they
            # committed, no task twice, none missing.
            sink_count = _scalar(connection, "SELECT count(*) FROM exactly_once_sink")
            assert sink_count == len(by_sink_workers)
            assert (
                _scalar(connection, "SELECT count(DISTINCT task_id) FROM exactly_once_sink")
                == sink_count
            )
            sink_rows = connection.execute(sa.select(sink.c.task_id, sink.c.worker)).all()
            sink_by_task = {str(task_id): worker for task_id, worker in sink_rows}
            assert set(sink_by_task) == by_sink_workers
            # Every result is the committing worker's, on either path.
            result_by_task = {
                str(task_id): (result or {}).get("worker")
                for task_id, result in connection.execute(sa.text("SELECT id, result FROM tasks"))
            }

            # The audit trail: one succeeded attempt per task, by the worker that wrote the
            # sink row; every other attempt ended because its lease expired.
            twice = connection.execute(
                sa.text(
                    "SELECT task_id FROM task_attempts WHERE outcome = 'succeeded' "
                    "GROUP BY task_id HAVING count(*) > 1"
                )
            ).all()
            assert twice == []
            winners = connection.execute(
                sa.text("SELECT task_id, worker_id FROM task_attempts WHERE outcome = 'succeeded'")
            ).all()
            assert len(winners) == N_TASKS
            winner_by_task = {str(t): w for t, w in winners}
            assert set(winner_by_task) == all_ids
            assert {t: winner_by_task[t] for t in sink_by_task} == sink_by_task
            outcomes = {
                outcome: n
                for outcome, n in connection.execute(
                    sa.text("SELECT outcome, count(*) FROM task_attempts GROUP BY outcome")
                )
            }
            total_attempts = _scalar(connection, "SELECT count(*) FROM task_attempts")
            assert total_attempts == _scalar(connection, "SELECT sum(attempt) FROM tasks")
            releases = _scalar(
                connection,
                "SELECT count(*) FROM (SELECT task_id FROM task_attempts "
                "GROUP BY task_id HAVING count(DISTINCT node_id) > 1) AS moved",
            )
        assert outcomes == {"succeeded": N_TASKS, "lease_expired": reaped}, outcomes

        # Each worker's successful completions: disjoint, together every task once, each
        # recorded as that worker's attempt, and (one at a time) exactly the sink rows it
        # wrote.
        assert sum(len(report["done"]) for report in reports.values()) == N_TASKS
        assert set().union(*done.values()) == all_ids
        sink_by_worker = Counter(sink_by_task.values())
        for name, ids in done.items():
            assert len(ids) == len(reports[name]["done"])
            assert all(winner_by_task[task_id] == name for task_id in ids)
            if _batched(name):
                assert sink_by_worker[name] == 0
                # The stale complete at the end commits None: only fresh leases commit.
                assert all(result_by_task[task_id] == name for task_id in ids)
            else:
                assert sink_by_worker[name] == len(ids)
                assert all(sink_by_task[task_id] == name for task_id in ids)

        # Fencing: every lease granted either committed or was refused, and each refusal
        # was a lease the reaper took back. None of the refused holders committed.
        lost_at_start = sum(r["lost_at_start"] for r in reports.values())
        lost_at_complete = sum(r["lost_at_complete"] for r in reports.values())
        leases = sum(r["leases"] for r in reports.values())
        assert sum(r["stale_commits"] for r in reports.values()) == 0
        assert lost_at_complete > 0, "no stale complete was exercised"
        assert leases == total_attempts == N_TASKS + reaped
        assert lost_at_start + lost_at_complete == reaped
        print(
            f"\n{N_TASKS} tasks, {N_WORKERS} workers in {elapsed:.1f}s: {leases} leases, "
            f"{reaped} reaped, {lost_at_start} refused at start, {lost_at_complete} refused "
            f"at complete, {releases} tasks leased on more than one worker; completions per "
            f"worker: { {name: len(ids) for name, ids in sorted(done.items())} }"
        )
    finally:
        store.close()
        postgres.drop(url)
