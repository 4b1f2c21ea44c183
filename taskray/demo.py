"""The store demo: a small pipeline driven through the store's own operations.

Until the scheduler and the SDK run tasks on Ray, this is what ``taskray demo``
shows: a DAG with mixed priorities and an idempotent repeat submitted in one
batch, leased in priority order, run, committed under its lease, one flaky task
that succeeds on retry and one poison task that ends in the dead-letter queue.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir
from rich.console import Console
from rich.table import Table

from taskray.models import RetryPolicy, Task, TaskSpec, TaskState
from taskray.store import Store
from taskray.store.engine import redacted

Handler = Callable[[Any, list[Any]], Any]


class NonRetryable(Exception):
    """A failure that retrying cannot fix."""


def _ingest(payload: Any, _upstream: list[Any]) -> list[int]:
    return [(i * 7919) % 101 for i in range(payload["rows"])]


def _transform(payload: Any, upstream: list[Any]) -> dict[str, float]:
    rows = upstream[0]
    op = payload["op"]
    reducers: dict[str, Callable[[list[int]], float]] = {
        "mean": statistics.fmean,
        "max": max,
        "stdev": statistics.pstdev,
    }
    value = reducers[op](rows)
    return {op: round(float(value), 3)}


def _report(_payload: Any, upstream: list[Any]) -> str:
    merged: dict[str, float] = {}
    for part in upstream:
        merged.update(part)
    return ", ".join(f"{k}={v}" for k, v in sorted(merged.items()))


def _flaky(payload: Any, _upstream: list[Any], _calls: dict[str, int] = {}) -> str:  # noqa: B006
    # Fails on its first try only: the state lives in the demo process on purpose.
    count = _calls[payload["name"]] = _calls.get(payload["name"], 0) + 1
    if count < 2:
        raise ConnectionError("upstream API timed out")
    return f"fetched on try {count}"


def _poison(_payload: Any, _upstream: list[Any]) -> None:
    raise NonRetryable("record 17 is malformed; retrying cannot help")


HANDLERS: dict[str, Handler] = {
    "demo:ingest": _ingest,
    "demo:transform": _transform,
    "demo:report": _report,
    "demo:flaky": _flaky,
    "demo:poison": _poison,
}


def demo_specs() -> list[TaskSpec]:
    quick_retry = RetryPolicy(max_retries=3, backoff_base_s=0.2, backoff_cap_s=1.0, jitter=0.2)
    return [
        TaskSpec("demo:ingest", {"rows": 500}, key="ingest", idempotency_key="demo-ingest"),
        *(
            TaskSpec("demo:transform", {"op": op}, key=op, depends_on=["ingest"], priority=prio)
            for op, prio in (("mean", 5), ("max", 1), ("stdev", 9))
        ),
        TaskSpec("demo:report", None, key="report", depends_on=["mean", "max", "stdev"]),
        TaskSpec("demo:flaky", {"name": "prices"}, priority=20, retry=quick_retry),
        TaskSpec("demo:poison", None, priority=3, retry=quick_retry),
        # The same ingest again, e.g. a client retrying its request: deduplicated.
        TaskSpec("demo:ingest", {"rows": 500}, idempotency_key="demo-ingest"),
    ]


def run_demo(database_url: str | None, console: Console | None = None) -> list[Task]:
    console = console or Console()
    url = database_url or f"sqlite:///{_fresh_demo_file()}"
    with Store.open(url) as store:
        console.print(f"[bold]taskray demo[/] — store at {redacted(url)}")
        results = store.submit_many(demo_specs())
        ids = list(dict.fromkeys(r.task.id for r in results))
        for spec, result in zip(demo_specs(), results, strict=True):
            note = " [yellow](deduplicated: same idempotency key)[/]" if result.deduplicated else ""
            console.print(
                f"  submitted {spec.type:<15} priority {spec.priority:>2} → "
                f"{result.task.status.value}{note}"
            )
        _work(store, console)
        tasks = store.get_many(ids)
        console.print(_table(store, tasks))
        dead = store.list_dead()
        console.print(
            f"{len(dead)} task(s) in the dead-letter queue; "
            "`taskray dlq list` shows them, `taskray dlq replay ID` runs one again."
        )
        return tasks


def _work(store: Store, console: Console) -> None:
    """Lease ready tasks in priority order and run them until nothing is left to run."""
    worker = f"demo-worker-{uuid.uuid4().hex[:6]}"
    while True:
        leases = store.claim(4, node_id="local")
        if not leases:
            due = store.next_scheduled_at()
            live = store.count_by_status()
            if due is None and not live.get(TaskState.LEASED) and not live.get(TaskState.RUNNING):
                return
            if due is not None:
                # A retry waits out its backoff: sleep until the store says it is due.
                time.sleep(max(0.0, min(1.0, (due - datetime.now(UTC)).total_seconds())))
            continue
        console.print(
            "  leased "
            + ", ".join(f"{lease.task.type}(p{lease.task.priority})" for lease in leases)
        )
        for lease in leases:
            task = lease.task
            store.start(task.id, lease.lease_id, worker_id=worker)
            upstream = [t.result for t in store.get_many(store.upstreams(task.id))]
            try:
                result = HANDLERS[task.type](task.payload, upstream)
            except Exception as exc:
                after = store.fail(
                    task.id,
                    lease.lease_id,
                    f"{type(exc).__name__}: {exc}",
                    retryable=not isinstance(exc, NonRetryable),
                )
                console.print(
                    f"    [red]✗[/] {task.type} attempt {task.attempt}: {exc}"
                    f" → {after.status.value}"
                )
            else:
                store.complete(task.id, lease.lease_id, result)
                console.print(
                    f"    [green]✓[/] {task.type} attempt {task.attempt} → {_summary(result)}"
                )


def _summary(result: Any) -> str:
    if isinstance(result, list):
        return f"{len(result)} rows"
    return repr(result)


def _table(store: Store, tasks: list[Task]) -> Table:
    table = Table(title="every task")
    for column in ("task", "type", "prio", "state", "attempts", "result / error"):
        table.add_column(column)
    colours = {TaskState.SUCCEEDED: "green", TaskState.DEAD: "red"}
    for task in tasks:
        colour = colours.get(task.status, "yellow")
        detail = (
            task.last_error if task.status is not TaskState.SUCCEEDED else _summary(task.result)
        )
        table.add_row(
            str(task.id)[:8],
            task.type,
            str(task.priority),
            f"[{colour}]{task.status.value}[/]",
            str(len(store.attempts(task.id))),
            (detail or "")[:48],
        )
    return table


def _fresh_demo_file() -> Path:
    path = Path(user_data_dir("taskray", appauthor=False)) / "demo.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path
