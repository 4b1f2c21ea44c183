"""Handles to submitted tasks, and waiting on them (``get``, ``wait``)."""

from __future__ import annotations

import html
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, overload

from tqdm.auto import tqdm

from taskray import serialization
from taskray.errors import GetTimeoutError, RemoteModeUnavailableError, TaskFailedError
from taskray.models import Attempt, Encoding, Task, TaskState
from taskray.sdk import runtime
from taskray.sdk.remote import RemoteBackend
from taskray.store import Store

log = logging.getLogger(__name__)


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


#: Ids read per query while waiting: only ids not yet known to be finished are re-read.
READ_BATCH = 5000
#: With notifications (PostgreSQL), re-read this often anyway, in case one was missed.
NOTIFIED_REREAD_S = 1.0
#: Without notifications (SQLite, or no listener), the poll interval starts short, so one
#: fast task is seen at once, and backs off while nothing finishes.
POLL_FIRST_S = 0.002
POLL_MAX_S = 0.05
#: Remote mode: the most ids one wait request names (the API's limit), and how long one
#: long poll lasts at most (well inside the client's HTTP timeout).
REMOTE_MAX_IDS = 10_000
REMOTE_LONG_POLL_S = 20.0


class _Listener(Protocol):
    """What ``Store.done_listener`` returns."""

    def wait(self, timeout_s: float) -> bool: ...
    def close(self) -> None: ...


class _Sleeper:
    """Plain polling, where a done listener cannot be opened (or broke)."""

    def wait(self, timeout_s: float) -> bool:
        time.sleep(max(0.0, timeout_s))
        return False

    def close(self) -> None:
        pass


def _open_done_listener(store: Store) -> tuple[_Listener, bool]:
    """The store's done listener and whether it is woken by notifications; polling if it
    cannot be opened (the database is down: the next read says so)."""
    try:
        return store.done_listener(poll_interval_s=POLL_MAX_S), store.is_postgres
    except Exception as exc:  # any failure here degrades to polling
        log.warning("cannot listen for finished tasks (%s); polling instead", exc)
        return _Sleeper(), False


def wait_terminal(
    store: runtime.TaskBackend,
    ids: Sequence[uuid.UUID],
    num_returns: int,
    deadline: float | None,
    *,
    tenant: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[uuid.UUID, Task]:
    """Wait until ``num_returns`` of ``ids`` are terminal, or until ``deadline`` (a
    ``time.monotonic()`` value; None: no limit). Returns the terminal tasks found (possibly
    more than ``num_returns``); reads them at least once, even past the deadline.

    On PostgreSQL a completion wakes the waiter (LISTEN/NOTIFY), with a re-read every
    second in case a notification was missed; elsewhere it polls, quickly at first. Each
    read asks only for the ids not yet finished, ``READ_BATCH`` at a time. ``tenant``
    scopes the reads (another tenant's task is unknown); ``on_progress`` is called with
    the number finished whenever it grows.
    """
    done: dict[uuid.UUID, Task] = {}
    pending = list(dict.fromkeys(ids))
    need = min(num_returns, len(pending))
    last_read_s = 0.0
    #: The first read checks that every id exists; later ones ask for finished tasks only.
    checked = False

    def read() -> bool:
        """Read the pending ids; True when enough have finished."""
        nonlocal pending, last_read_s, checked
        started = time.monotonic()
        before = len(done)
        for start in range(0, len(pending), READ_BATCH):
            chunk = pending[start : start + READ_BATCH]
            if isinstance(store, Store):
                # States first (ids and states only), then the rows of the finished ones:
                # a read costs what finished, not what is still pending.
                states = store.states_of(chunk, tenant=tenant, finished_only=checked)
                finished = [i for i in chunk if i in states and states[i].is_terminal]
                tasks = store.get_many(finished, tenant=tenant) if finished else []
            else:
                assert tenant is None, "tenant-scoped reads need the store"
                tasks = store.get_many(chunk)
            for task in tasks:
                if task.status.is_terminal:
                    done[task.id] = task
            if len(done) >= need:
                break
        else:
            checked = True
        if len(done) > before:
            pending = [i for i in pending if i not in done]
            if on_progress is not None:
                on_progress(len(done))
        last_read_s = time.monotonic() - started
        return len(done) >= need

    def remaining() -> float | None:
        return None if deadline is None else deadline - time.monotonic()

    notifying = isinstance(store, Store) and store.is_postgres
    # With notifications, read once before opening a listener: tasks already finished
    # cost one read and no connection. (Without, the listener costs nothing.)
    if notifying and (read() or (deadline is not None and time.monotonic() >= deadline)):
        return done
    listener: _Listener
    if isinstance(store, Store):
        listener, notifying = _open_done_listener(store)
    else:
        listener, notifying = _Sleeper(), False
    try:
        interval = POLL_FIRST_S
        while True:
            # A read after the listener is open: what finished before it listened is seen.
            before = len(done)
            if read():
                return done
            left = remaining()
            if left is not None and left <= 0:
                return done
            if notifying:
                pause = NOTIFIED_REREAD_S
            else:
                interval = POLL_FIRST_S if len(done) > before else min(interval * 1.5, POLL_MAX_S)
                # Never spend more than about half the time reading.
                pause = max(interval, last_read_s)
            if left is not None:
                pause = min(pause, left)
            try:
                if listener.wait(pause) and last_read_s > 0:
                    # A burst of completions: let it gather for as long as a read takes
                    # (reading stays under about half the time), then drop its wake-ups.
                    left = remaining()
                    time.sleep(last_read_s if left is None else min(last_read_s, max(0.0, left)))
                    listener.wait(0.0)
            except Exception as exc:  # a broken connection (the database restarted): poll
                log.warning("lost the listener for finished tasks (%s); polling instead", exc)
                _close_quietly(listener)
                listener, notifying = _Sleeper(), False
    finally:
        _close_quietly(listener)


def _close_quietly(listener: _Listener) -> None:
    try:
        listener.close()
    except Exception:  # closing a broken connection
        log.debug("closing a done listener failed", exc_info=True)


def _finished_remote(
    backend: RemoteBackend,
    ids: list[uuid.UUID],
    num_returns: int,
    deadline: float | None,
    on_progress: Callable[[int], None],
) -> dict[uuid.UUID, Task]:
    """Remote mode: long polls on ``POST /v1/tasks/wait`` until enough finished."""
    done: dict[uuid.UUID, Task] = {}
    pending = list(ids)
    need = min(num_returns, len(pending))
    while True:
        chunks = [pending[i : i + REMOTE_MAX_IDS] for i in range(0, len(pending), REMOTE_MAX_IDS)]
        # More ids than one request holds: the others are read without waiting, and the
        # first chunk's poll wakes at its first completion, and after a second at most.
        for chunk in chunks[1:]:
            for task in backend.wait(chunk, num_returns=0, timeout_s=0.0):
                done[task.id] = task
        if chunks and len(done) < need:
            first = chunks[0]
            wanted = min(need - len(done), len(first)) if len(chunks) == 1 else 1
            poll = REMOTE_LONG_POLL_S if len(chunks) == 1 else 1.0
            if deadline is not None:
                poll = max(0.0, min(poll, deadline - time.monotonic()))
            for task in backend.wait(first, num_returns=wanted, timeout_s=poll):
                done[task.id] = task
        pending = [i for i in pending if i not in done]
        on_progress(len(done))
        if len(done) >= need or (deadline is not None and time.monotonic() >= deadline):
            return done


def _finished(
    store: runtime.TaskBackend,
    ids: list[uuid.UUID],
    num_returns: int,
    timeout: float | None,
    progress: bool,
) -> dict[uuid.UUID, Task]:
    """Wait until ``num_returns`` of ``ids`` are terminal (or the timeout); returns those."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(dict.fromkeys(ids))
    bar = tqdm(total=len(pending), desc="tasks", unit="task", disable=not progress, leave=False)

    def advance(finished: int) -> None:
        bar.update(finished - bar.n)

    try:
        if isinstance(store, RemoteBackend):
            return _finished_remote(store, pending, num_returns, deadline, advance)
        return wait_terminal(store, pending, num_returns, deadline, on_progress=advance)
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
        results.append(_result(store, task))
    return results[0] if single else results


def _result(store: runtime.TaskBackend, task: Task) -> Any:
    """A succeeded task's result, decoded as its task records (never by its shape)."""
    if task.encoding is Encoding.PICKLE and isinstance(store, RemoteBackend):
        # A client of the REST API unpickles nothing it receives.
        raise RemoteModeUnavailableError(
            f"task {task.id} returned a Python pickle (it was submitted with a database "
            "connection); read it with taskray.init(database_url=...)"
        )
    return serialization.decode(task.result, task.encoding)


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
