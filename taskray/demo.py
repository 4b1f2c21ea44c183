"""``taskray demo``: a small data pipeline on the embedded default, end to end.

A local Ray (declaring one GPU), a fresh SQLite file and the scheduler actor;
then real tasks: an ingest, a fan-out of CPU transforms with mixed
priorities, a step that asks for the GPU, a report that gathers them, a flaky
fetch that succeeds on retry and a poison record that ends in the dead-letter
queue. The functions live in this module so every worker can import them.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import taskray
from taskray import serialization
from taskray.models import Task, TaskState
from taskray.sdk import runtime
from taskray.store.engine import redacted


@taskray.task(priority=5)
def ingest(rows: int) -> list[int]:
    return [(i * 7919) % 101 for i in range(rows)]


@taskray.task
def transform(data: list[int], op: str) -> dict[str, float]:
    ops: dict[str, Callable[[list[int]], float]] = {
        "mean": statistics.fmean,
        "max": max,
        "stdev": statistics.pstdev,
        "p90": lambda xs: statistics.quantiles(xs, n=10)[-1],
    }
    return {op: round(float(ops[op](data)), 3)}


@taskray.task(num_gpus=1, num_cpus=1)
def embed_on_gpu(data: list[int]) -> str:
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "?")
    return f"{len(data)} rows embedded on GPU {device}"


@taskray.task(priority=1)
def report(parts: list[dict[str, float]], embedding: str) -> str:
    merged: dict[str, float] = {}
    for part in parts:
        merged.update(part)
    stats = ", ".join(f"{k}={v}" for k, v in sorted(merged.items()))
    return f"{stats}; {embedding}"


@taskray.task(priority=9, max_retries=3, retry_backoff=(0.5, 2.0))
def fetch_prices(marker: str) -> str:
    # Fails on its first try only; the marker file tells a later try (in any worker).
    if not Path(marker).exists():
        Path(marker).touch()
        raise ConnectionError("price feed timed out")
    return "prices fetched"


@taskray.task(priority=3)
def parse_record(record: str) -> dict[str, Any]:
    if not record.startswith("{"):
        raise taskray.NonRetryableError(f"record is not JSON: {record[:20]!r}")
    return {"ok": True}


def _fresh_demo_database() -> str:
    path = Path(user_data_dir("taskray", appauthor=False)) / "demo.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


def run_demo(database_url: str | None = None, console: Console | None = None) -> list[Task]:
    console = console or Console()
    url = database_url or _fresh_demo_database()
    console.print(f"[bold]taskray demo[/]: a local Ray with one GPU, store at {redacted(url)}")
    started = time.monotonic()
    rt = taskray.init(url, num_cpus=4, num_gpus=1, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="taskray-demo-") as scratch:
            handles = _submit_pipeline(console, str(Path(scratch) / "prices-marker"))
            _follow(console, rt, handles)
        tasks = rt.store.get_many(list(dict.fromkeys(h.id for h in handles)))
        console.print(_table(rt, tasks))
        final = next(t for t in tasks if t.type.endswith(":report"))
        console.print(f"report: [bold]{serialization.decode(final.result, final.encoding)}[/]")
        dead = [t for t in tasks if t.status is TaskState.DEAD]
        console.print(
            f"done in {time.monotonic() - started:.1f}s. {len(dead)} task(s) in the "
            "dead-letter queue. Next: `taskray dlq list`, `taskray status <id>`, and "
            "notebooks/quickstart.ipynb for the SDK step by step."
        )
        return tasks
    finally:
        taskray.shutdown()


def _submit_pipeline(console: Console, marker: str) -> list[taskray.TaskHandle]:
    data = ingest.options(idempotency_key="demo-ingest").submit(2000)
    # The same ingest submitted again (a client retrying, a re-run cell): deduplicated.
    repeat = ingest.options(idempotency_key="demo-ingest").submit(2000)
    console.print(f"  ingest submitted; repeat deduplicated: {repeat.deduplicated}")
    parts = [
        transform.options(priority=p).submit(data, op)
        for op, p in (("mean", 2), ("max", 0), ("stdev", 7), ("p90", 4))
    ]
    embedding = embed_on_gpu.submit(data)
    final = report.submit(parts, embedding)
    flaky = fetch_prices.submit(marker)
    poison = parse_record.submit("<html>not a record")
    console.print(
        "  submitted: ingest -> 4 transforms + a GPU step -> report; a flaky fetch; a poison record"
    )
    return [data, repeat, *parts, embedding, final, flaky, poison]


def _follow(console: Console, rt: runtime.Runtime, handles: list[taskray.TaskHandle]) -> None:
    ids = list(dict.fromkeys(h.id for h in handles))
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("running", total=len(ids))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            tasks = rt.store.get_many(ids)
            done = sum(t.status.is_terminal for t in tasks)
            running = sum(t.status is TaskState.RUNNING for t in tasks)
            progress.update(bar, completed=done, description=f"running ({running} now)")
            if done == len(ids):
                return
            time.sleep(0.1)
    raise taskray.GetTimeoutError("the demo's tasks did not finish within 120 s")


def _table(rt: runtime.Runtime, tasks: list[Task]) -> Table:
    table = Table(title="every task")
    for column in ("task", "function", "state", "node", "attempts", "duration", "error"):
        table.add_column(column)
    colours = {TaskState.SUCCEEDED: "green", TaskState.DEAD: "red"}
    for task in tasks:
        colour = colours.get(task.status, "yellow")
        duration = (
            f"{(task.completed_at - task.started_at).total_seconds():.2f}s"
            if task.completed_at and task.started_at
            else ""
        )
        table.add_row(
            str(task.id)[:8],
            task.type.rsplit(":", 1)[-1],
            f"[{colour}]{task.status.value}[/]",
            (task.node_id or "")[:8],
            str(len(rt.store.attempts(task.id))),
            duration,
            (task.last_error or "")[:40],
        )
    return table
