"""Handles to submitted tasks, and waiting on them (``get``, ``wait``)."""

from __future__ import annotations

import html
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, overload

from tqdm.auto import tqdm

from taskray import serialization
from taskray.errors import GetTimeoutError, TaskFailedError
from taskray.models import Attempt, Task, TaskState
from taskray.sdk import runtime


class TaskHandle:
    """A submitted task. Pass it to another task's ``submit`` to make a DAG edge."""

    __slots__ = ("deduplicated", "id", "type")

    def __init__(self, task_id: uuid.UUID, task_type: str, deduplicated: bool = False) -> None:
        self.id = task_id
        self.type = task_type
        #: True when an idempotency key made this submit return an earlier task.
        self.deduplicated = deduplicated

    def __repr__(self) -> str:
        return f"TaskHandle({self.id}, {self.type!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def task(self) -> Task:
        return runtime.current().store.get(self.id)

    def status(self) -> TaskState:
        return self.task().status

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its result; ``TaskFailedError`` if it did not succeed."""
        return get(self, timeout=timeout, progress=False)

    def cancel(self) -> TaskState:
        """Cancel the task; a running one is stopped by the scheduler."""
        return runtime.current().store.cancel(self.id).status

    def attempts(self) -> list[Attempt]:
        return runtime.current().store.attempts(self.id)

    def dag(self) -> HandleList:
        """This task and every task upstream of it, upstreams first."""
        store = runtime.current().store
        order: list[uuid.UUID] = []
        seen: set[uuid.UUID] = set()

        def visit(task_id: uuid.UUID) -> None:
            if task_id in seen:
                return
            seen.add(task_id)
            for upstream in store.upstreams(task_id):
                visit(upstream)
            order.append(task_id)

        visit(self.id)
        tasks = store.get_many(order)
        return HandleList(TaskHandle(t.id, t.type) for t in tasks)

    def _repr_html_(self) -> str:
        return render_html([self])


class HandleList(list[TaskHandle]):
    """A list of handles that renders as a table in Jupyter."""

    def _repr_html_(self) -> str:
        return render_html(self)


def _duration(task: Task) -> str:
    if task.started_at is None:
        return ""
    end = task.completed_at
    if end is None:
        return "running"
    return f"{(end - task.started_at).total_seconds():.2f}s"


_STATE_COLOURS = {
    TaskState.SUCCEEDED: "#1a7f37",
    TaskState.DEAD: "#cf222e",
    TaskState.UPSTREAM_FAILED: "#cf222e",
    TaskState.CANCELLED: "#6e7781",
}


def render_html(handles: Sequence[TaskHandle]) -> str:
    store = runtime.current().store
    tasks = store.get_many([h.id for h in handles])
    rows = []
    for task in tasks:
        colour = _STATE_COLOURS.get(task.status, "#9a6700")
        cells = [
            f"<code>{str(task.id)[:8]}</code>",
            html.escape(task.type),
            f'<span style="color:{colour}">{task.status.value}</span>',
            html.escape((task.node_id or "")[:8]),
            str(task.attempt),
            _duration(task),
            html.escape((task.last_error or "")[:120]),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(
        f"<th>{h}</th>" for h in ("task", "type", "state", "node", "attempts", "duration", "error")
    )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _failure(store: runtime.TaskBackend, task: Task) -> TaskFailedError:
    traceback = None
    attempts = store.attempts(task.id)
    if attempts:
        traceback = attempts[-1].traceback
    if task.status is TaskState.DEAD:
        message = f"task {task.id} ({task.type}) is dead-lettered: {task.last_error}"
    elif task.status is TaskState.CANCELLED:
        message = f"task {task.id} ({task.type}) was cancelled: {task.last_error}"
    else:
        message = f"task {task.id} ({task.type}) did not run: {task.last_error}"
    return TaskFailedError(
        message, task_id=str(task.id), status=task.status.value, remote_traceback=traceback
    )


def _finished(
    store: runtime.TaskBackend,
    ids: list[uuid.UUID],
    num_returns: int,
    timeout: float | None,
    progress: bool,
) -> dict[uuid.UUID, Task]:
    """Poll until ``num_returns`` of ``ids`` are terminal (or the timeout); returns those."""
    deadline = None if timeout is None else time.monotonic() + timeout
    done: dict[uuid.UUID, Task] = {}
    pending = list(dict.fromkeys(ids))
    bar = tqdm(total=len(pending), desc="tasks", unit="task", disable=not progress, leave=False)
    interval = 0.01
    try:
        while True:
            for task in store.get_many(pending):
                if task.status.is_terminal:
                    done[task.id] = task
            if done:
                pending = [i for i in pending if i not in done]
            bar.update(len(done) - bar.n)
            if len(done) >= num_returns or not pending:
                return done
            if deadline is not None and time.monotonic() >= deadline:
                return done
            # Poll quickly at first (short tasks), then back off to spare the database.
            wait = interval if deadline is None else min(interval, deadline - time.monotonic())
            time.sleep(max(0.0, wait))
            interval = min(interval * 1.5, 0.25)
    finally:
        bar.close()


@overload
def get(
    handles: TaskHandle, *, timeout: float | None = ..., progress: bool | None = ...
) -> Any: ...


@overload
def get(
    handles: Iterable[TaskHandle], *, timeout: float | None = ..., progress: bool | None = ...
) -> list[Any]: ...


def get(
    handles: TaskHandle | Iterable[TaskHandle],
    *,
    timeout: float | None = None,
    progress: bool | None = None,
) -> Any:
    """The results of one handle or a list of handles, waiting for them like ``ray.get``.

    Raises ``TaskFailedError`` (with the remote traceback) for a task that did not
    succeed, and ``GetTimeoutError`` if they are not all done within ``timeout`` seconds.
    Waiting on many shows a progress bar (``progress=False`` hides it).
    """
    single = isinstance(handles, TaskHandle)
    items: list[TaskHandle] = [handles] if isinstance(handles, TaskHandle) else list(handles)
    store = runtime.current().store
    ids = [h.id for h in items]
    show = len(set(ids)) > 1 if progress is None else progress
    done = _finished(store, ids, len(set(ids)), timeout, show)
    missing = [i for i in ids if i not in done]
    if missing:
        raise GetTimeoutError(
            f"{len(set(missing))} of {len(set(ids))} task(s) not finished after {timeout}s"
        )
    results = []
    for task_id in ids:
        task = done[task_id]
        if task.status is not TaskState.SUCCEEDED:
            raise _failure(store, task)
        results.append(serialization.from_json(task.result))
    return results[0] if single else results


def wait(
    handles: Sequence[TaskHandle],
    *,
    num_returns: int = 1,
    timeout: float | None = None,
    progress: bool = False,
) -> tuple[list[TaskHandle], list[TaskHandle]]:
    """Like ``ray.wait``: (finished, not finished) once ``num_returns`` have finished, or
    when ``timeout`` runs out; at most ``num_returns`` are listed as finished. Finished
    includes failed tasks; ``get`` tells which."""
    items = list(handles)
    if not 0 <= num_returns <= len(items):
        raise ValueError(f"num_returns must be within 0..{len(items)}, got {num_returns}")
    store = runtime.current().store
    done = _finished(store, [h.id for h in items], num_returns, timeout, progress)
    ready: list[TaskHandle] = []
    for handle in items:
        if handle.id in done and len(ready) < max(num_returns, 1):
            ready.append(handle)
    taken = set(map(id, ready))
    return ready, [h for h in items if id(h) not in taken]
