"""Runs one leased task on a worker node and commits its outcome under its lease.

The scheduler dispatches :func:`execute` as a Ray task pinned to the node it
chose. Here, on that node, the executor marks the task started, heartbeats
its lease from a background thread, resolves the task type to a callable,
runs it, and commits the result with ``complete`` or the error with ``fail``.
Every write is fenced by the lease: a lost lease stops the commit and is
logged, never applied.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import cloudpickle
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from taskray import serialization
from taskray.errors import LeaseLostError, StoreUnavailableError, TaskrayError
from taskray.models import Task, TaskState
from taskray.store import Store, TransactionalWrite

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long the executor keeps retrying a store that cannot be reached before giving up;
#: the lease then expires and the reaper retries the task elsewhere.
STORE_RETRY_DEADLINE_S = 60.0


class NonRetryableError(Exception):
    """Raise (or subclass) this in a handler for a failure that retrying cannot fix: the task
    goes to the dead-letter queue at once."""


class UnknownTaskTypeError(TaskrayError, NonRetryableError):
    """The task type names no registered or importable function."""


@dataclass(frozen=True, slots=True)
class Commit:
    """Return this from a handler to write its own rows in the transaction that commits its
    result: both commit, or neither does (the exactly-once sink)."""

    result: Any
    write: TransactionalWrite


_registry: dict[str, Callable[..., Any]] = {}
_registry_lock = threading.Lock()


def register(name: str, function: Callable[..., Any]) -> None:
    """Make ``function`` the handler of task type ``name`` in this process."""
    with _registry_lock:
        _registry[name] = function


def resolve(task_type: str, store: Store | None = None) -> Callable[..., Any]:
    """The handler for ``task_type``: a registered function, a function shipped by value
    (loaded from ``store`` once per process), or ``module:attribute``."""
    with _registry_lock:
        found = _registry.get(task_type)
    if found is not None:
        return found
    digest = serialization.digest_of_type(task_type)
    if digest is not None:
        if store is None:
            raise UnknownTaskTypeError(f"task type {task_type!r} needs the store to load")
        try:
            function = cloudpickle.loads(store.get_function(digest))
        except TaskrayError:
            raise UnknownTaskTypeError(f"no stored function for task type {task_type!r}") from None
        register(task_type, function)
        return function  # type: ignore[no-any-return]
    module_name, sep, attribute = task_type.partition(":")
    if not sep or not module_name or not attribute:
        raise UnknownTaskTypeError(
            f"unknown task type {task_type!r}: register it, or name it as 'module:function'"
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise UnknownTaskTypeError(f"cannot load task type {task_type!r}: {exc}") from None
    if not callable(target):
        raise UnknownTaskTypeError(f"task type {task_type!r} is not callable")
    return target  # type: ignore[no-any-return]


class UpstreamNotReadyError(TaskrayError, NonRetryableError):
    """The payload names a task whose result this task cannot have: not one of its
    upstreams, or one that has not succeeded."""


def upstream_results(store: Store, task: Task) -> Callable[[uuid.UUID], Any]:
    """Results of the task's own upstreams, and of no other task: a payload naming any other
    task (another tenant's, say) gets nothing."""
    allowed: set[uuid.UUID] | None = None

    def result_of(task_id: uuid.UUID) -> Any:
        nonlocal allowed
        if allowed is None:
            allowed = set(store.upstreams(task.id))
        if task_id not in allowed:
            raise UpstreamNotReadyError(f"task {task_id} is not an upstream of this task")
        upstream = store.get(task_id)
        if upstream.status is not TaskState.SUCCEEDED:
            raise UpstreamNotReadyError(f"upstream task {task_id} is {upstream.status.value}")
        return serialization.from_json(upstream.result)

    return result_of


#: Metadata key listing the exception classes (``module.QualName``) worth a retry; any
#: other exception dead-letters the task at once. Absent: every exception is retried.
RETRY_ON_METADATA_KEY = "taskray:retry_on"


def is_retryable(error: BaseException, task: Task | None = None) -> bool:
    if isinstance(error, NonRetryableError) or getattr(error, "retryable", True) is False:
        return False
    retry_on = task.metadata.get(RETRY_ON_METADATA_KEY) if task is not None else None
    if retry_on is None:
        return True
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(error).__mro__}
    return bool(names & set(retry_on))


_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def store_for(database_url: str) -> Store:
    """One store (and connection pool) per database per worker process, reused across tasks."""
    with _stores_lock:
        store = _stores.get(database_url)
        if store is None:
            store = _stores[database_url] = Store.open(database_url, migrate=False)
        return store


def _with_retries(call: Callable[[], T]) -> T:
    for attempt in Retrying(
        retry=retry_if_exception_type(StoreUnavailableError),
        wait=wait_exponential_jitter(initial=0.1, max=5.0),
        stop=stop_after_delay(STORE_RETRY_DEADLINE_S),
        reraise=True,
    ):
        with attempt:
            return call()
    raise AssertionError("unreachable")


class _Heartbeat(threading.Thread):
    """Extends the lease every ``interval_s`` until stopped or the lease is lost."""

    def __init__(
        self, store: Store, task: Task, lease_id: uuid.UUID, interval_s: float, ttl_s: float
    ):
        super().__init__(name=f"taskray-heartbeat-{task.id}", daemon=True)
        self.store, self.task, self.lease_id = store, task, lease_id
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.store.heartbeat(self.task.id, self.lease_id, ttl_s=self.ttl_s)
            except LeaseLostError:
                log.warning(
                    "task %s lost its lease; its result will not be committed", self.task.id
                )
                return
            except StoreUnavailableError:
                log.warning(
                    "heartbeat for task %s failed: store unreachable; retrying", self.task.id
                )

    def stop(self) -> None:
        self.stopped.set()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def execute(
    database_url: str,
    task_id: str,
    lease_id: str,
    heartbeat_interval_s: float = 10.0,
    lease_ttl_s: float = 30.0,
) -> str:
    """Run one leased task to its outcome; returns what happened, for the scheduler's log."""
    store = store_for(database_url)
    lease = uuid.UUID(lease_id)
    try:
        task = _with_retries(lambda: store.start(task_id, lease, worker_id=worker_id()))
    except LeaseLostError:
        log.warning("task %s: lease %s gone before start; not running it", task_id, lease_id)
        return "lease_lost"
    heartbeat = _Heartbeat(store, task, lease, heartbeat_interval_s, lease_ttl_s)
    heartbeat.start()
    try:
        try:
            handler = resolve(task.type, store)
            args, kwargs = serialization.decode_call(task.payload, upstream_results(store, task))
            outcome = handler(*args, **kwargs)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            trace = traceback.format_exc()
            retryable = is_retryable(exc, task) and not isinstance(exc, UnknownTaskTypeError)
            return _commit_failure(store, task, lease, error, trace, retryable)
        heartbeat.stop()
        write = outcome.write if isinstance(outcome, Commit) else None
        result = outcome.result if isinstance(outcome, Commit) else outcome
        # A Python caller gets its result back as the very object (pickled); a task
        # submitted as JSON keeps a JSON result that any client can read.
        if serialization.is_pickled(task.payload):
            result = serialization.to_json(result)
        try:
            stored = result
            _with_retries(lambda: store.complete(task.id, lease, stored, write=write))
        except LeaseLostError:
            log.warning("task %s finished but its lease is gone; result not committed", task.id)
            return "lease_lost"
        except TaskrayError as exc:
            # The result itself is unacceptable (too large, not JSON): retrying will not help.
            return _commit_failure(store, task, lease, exc.message, None, retryable=False)
        return "succeeded"
    finally:
        heartbeat.stop()


def _commit_failure(
    store: Store, task: Task, lease: uuid.UUID, error: str, trace: str | None, retryable: bool
) -> str:
    try:
        after = _with_retries(
            lambda: store.fail(task.id, lease, error, traceback=trace, retryable=retryable)
        )
    except LeaseLostError:
        log.warning("task %s failed but its lease is gone; failure not recorded", task.id)
        return "lease_lost"
    return after.status.value
