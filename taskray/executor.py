"""Runs leased tasks on a worker node and commits their outcomes under their leases.

The scheduler dispatches :func:`execute_batch` as a Ray task pinned to the node
it chose, holding the resources of one task: a *lane*. Here, on that node, the
executor marks the lane's tasks started in one statement, keeps their leases
alive from one thread per process, runs them back to back in this warm worker,
and commits their outcomes in groups (``complete_many``/``fail_many``). Every
write is fenced per row by its lease: a lost lease stops that task's commit and
is reported, never applied, while the rest of the group commits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import cloudpickle
import ray

from taskray import registry, serialization
from taskray.errors import (
    LeaseLostError,
    StoreUnavailableError,
    TaskrayError,
    UnknownTaskError,
    UnregisteredTaskTypeError,
)
from taskray.models import Encoding, Failure, Success, Task, TaskState
from taskray.node import NodeStore, with_retries

if TYPE_CHECKING:
    # Every worker process imports this module; executors reach the store through their
    # node's agent, so the store (SQLAlchemy, psycopg) is not imported here.
    from taskray.store import TransactionalWrite

log = logging.getLogger(__name__)


T = TypeVar("T")


class NonRetryableError(Exception):
    """Raise (or subclass) this in a handler for a failure that retrying cannot fix: the task
    goes to the dead-letter queue at once."""


class UnknownTaskTypeError(TaskrayError, NonRetryableError):
    """The task type names no registered function."""


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


def resolve(task_type: str, store: NodeStore | None = None) -> Callable[..., Any]:
    """The handler for ``task_type``, if it is registered (DESIGN, Trust): a function of the
    deployment's task modules (:mod:`taskray.registry`), or one a trusted Python client
    registered in the store's functions table: shipped by value (``pickled:``), or an
    ``@taskray.task`` function it submitted by ``module:function``. Anything else, a row
    written straight into the database included, raises ``UnknownTaskTypeError``: the task
    is dead-lettered with the reason, and nothing it names is imported."""
    with _registry_lock:
        found = _registry.get(task_type)
    if found is not None:
        return found
    try:
        return registry.deployment().resolve(task_type)
    except UnregisteredTaskTypeError as exc:
        refusal = exc.message
    digest = serialization.digest_of_type(task_type)
    if digest is None and ":" in task_type:
        digest = serialization.registration_digest(task_type)
    if digest is None or store is None:
        raise UnknownTaskTypeError(refusal)
    try:
        blob = store.get_function(digest)
    except UnknownTaskError:
        if serialization.digest_of_type(task_type) is not None:
            refusal = f"no stored function for task type {task_type!r}"
        raise UnknownTaskTypeError(refusal) from None
    # Written only by clients that hold the database (the API never writes this table).
    function = cloudpickle.loads(blob)
    register(task_type, function)
    return function  # type: ignore[no-any-return]


class UpstreamNotReadyError(TaskrayError, NonRetryableError):
    """The payload names a task whose result this task cannot have: not one of its
    upstreams, or one that has not succeeded."""


def upstream_results(store: NodeStore, task: Task) -> Callable[[uuid.UUID], Any]:
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
        return serialization.decode(upstream.result, upstream.encoding)

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


_keepers: dict[tuple[str, float, float], _LeaseKeeper] = {}
_node_stores: dict[str, NodeStore] = {}
_node_stores_lock = threading.Lock()

#: Outcomes wait at most this long for the rest of their group before they are committed.
COMMIT_GROUP_S = 0.002


class _LeaseKeeper(threading.Thread):
    """Extends the leases of every task this process holds, all in one statement per
    interval: one thread per process, not one per task."""

    def __init__(self, store: NodeStore, interval_s: float, ttl_s: float) -> None:
        super().__init__(name="taskray-lease-keeper", daemon=True)
        self.store, self.interval_s, self.ttl_s = store, interval_s, ttl_s
        self._held: dict[uuid.UUID, uuid.UUID] = {}
        self._lock = threading.Lock()

    def hold(self, leases: Iterable[tuple[uuid.UUID, uuid.UUID]]) -> None:
        with self._lock:
            self._held.update(leases)

    def release(self, task_ids: Iterable[uuid.UUID]) -> None:
        with self._lock:
            for task_id in task_ids:
                self._held.pop(task_id, None)

    def run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            with self._lock:
                held = list(self._held.items())
            if not held:
                continue
            try:
                renewed = self.store.heartbeat_many(held, ttl_s=self.ttl_s)
            except Exception as exc:  # the keeper outlives any one failure, a dead store too
                log.warning("heartbeat of %d lease(s) failed (%s); retrying", len(held), exc)
                continue
            if renewed.refused:
                log.warning(
                    "%d task(s) lost their lease; their results will not be committed",
                    len(renewed.refused),
                )
                self.release(renewed.refused)


def node_store(agent: Any) -> NodeStore:
    """The store through this node's agent, one per agent per process."""
    key = agent._actor_id.hex()
    with _node_stores_lock:
        store = _node_stores.get(key)
        if store is None:
            store = _node_stores[key] = NodeStore(agent)
        return store


def lease_keeper(key: str, store: NodeStore, interval_s: float, ttl_s: float) -> _LeaseKeeper:
    with _node_stores_lock:
        keeper = _keepers.get((key, interval_s, ttl_s))
        if keeper is None:
            keeper = _keepers[(key, interval_s, ttl_s)] = _LeaseKeeper(store, interval_s, ttl_s)
            keeper.start()
        return keeper


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def free_gpu_memory() -> None:
    """Give cached GPU memory back after a GPU task, so the next task in this warm process
    (or any other process on the GPU) can have it. Only frameworks already imported by a
    handler are touched; importing one here would cost seconds and memory."""
    gc.collect()  # tensors held only by reference cycles go first, then the caches
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.ipc_collect()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        with contextlib.suppress(Exception):
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
    jax = sys.modules.get("jax")
    if jax is not None:
        with contextlib.suppress(Exception):
            jax.clear_caches()


class _LaneClock:
    """Database time on the executor: the lane's start by the database clock plus the time
    since by this process's monotonic clock (DESIGN invariant 4 holds: a node's wall clock
    is never read; a lane lasts milliseconds, so drift does not matter)."""

    def __init__(self, at: datetime | None) -> None:
        self.at, self.base = at, time.perf_counter()

    def __call__(self, mark: float) -> datetime | None:
        return None if self.at is None else self.at + timedelta(seconds=mark - self.base)


@dataclass(frozen=True, slots=True)
class _Outcome:
    task: Task
    lease_id: uuid.UUID
    seconds: float
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: ``time.perf_counter()`` when the handler was called.
    began: float = 0.0
    result: Any = None
    write: TransactionalWrite | None = None
    error: str | None = None
    trace: str | None = None
    retryable: bool = True


def _run_one(store: NodeStore, task: Task, lease_id: uuid.UUID, clock: _LaneClock) -> _Outcome:
    outcome = _call(store, task, lease_id)
    return dataclasses.replace(
        outcome, started_at=clock(outcome.began), finished_at=clock(outcome.began + outcome.seconds)
    )


def _call(store: NodeStore, task: Task, lease_id: uuid.UUID) -> _Outcome:
    began = time.perf_counter()
    try:
        handler = resolve(task.type, store)
        args, kwargs = serialization.decode_call(
            task.payload, task.encoding, upstream_results(store, task)
        )
        returned = handler(*args, **kwargs)
        write = returned.write if isinstance(returned, Commit) else None
        result = returned.result if isinstance(returned, Commit) else returned
        # A Python caller gets its result back as the very object (pickled); a task
        # submitted as JSON keeps a JSON result that any client can read. The task's
        # encoding covers its result too: the commit needs no column of its own.
        if task.encoding is Encoding.PICKLE:
            result = serialization.to_json(result)
        store.check_result(result)
    except Exception as exc:
        if isinstance(exc, TaskrayError) and not isinstance(exc, UnknownTaskTypeError):
            # The result itself is unacceptable (too large, not JSON): retrying cannot help.
            error, retryable = exc.message, False
        else:
            error = f"{type(exc).__name__}: {exc}"
            retryable = is_retryable(exc, task) and not isinstance(exc, UnknownTaskTypeError)
        return _Outcome(
            task,
            lease_id,
            time.perf_counter() - began,
            began=began,
            error=error,
            trace=traceback.format_exc(),
            retryable=retryable,
        )
    return _Outcome(
        task, lease_id, time.perf_counter() - began, began=began, result=result, write=write
    )


class _CommitGroup:
    """Outcomes waiting to be committed together; the report of what was committed."""

    def __init__(self, store: NodeStore) -> None:
        self.store = store
        self.pending: list[_Outcome] = []
        self.first_at = 0.0
        #: (task id, what happened, seconds the handler ran) per task, for the scheduler.
        self.report: list[tuple[str, str, float]] = []

    def add(self, outcome: _Outcome) -> None:
        if outcome.write is not None:
            # A handler's own writes commit in its task's transaction, alone.
            self.flush()
            self._commit_with_write(outcome)
            return
        if not self.pending:
            self.first_at = time.perf_counter()
        self.pending.append(outcome)
        if time.perf_counter() - self.first_at >= COMMIT_GROUP_S:
            self.flush()

    def _commit_with_write(self, outcome: _Outcome) -> None:
        task, lease, write = outcome.task, outcome.lease_id, outcome.write
        try:
            with_retries(lambda: self.store.complete(task.id, lease, outcome.result, write=write))
        except LeaseLostError:
            log.warning("task %s finished but its lease is gone; result not committed", task.id)
            self.report.append((str(task.id), "lease_lost", outcome.seconds))
            return
        except TaskrayError as exc:
            self.pending.append(dataclasses.replace(outcome, error=exc.message, retryable=False))
            self.flush()
            return
        self.report.append((str(task.id), TaskState.SUCCEEDED.value, outcome.seconds))

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        seconds = {o.task.id: o.seconds for o in pending}
        successes = [
            Success(o.task.id, o.lease_id, o.result, o.started_at, o.finished_at)
            for o in pending
            if o.error is None
        ]
        failures = [
            Failure(
                o.task.id, o.lease_id, o.error, o.trace, o.retryable, o.started_at, o.finished_at
            )
            for o in pending
            if o.error is not None
        ]
        # Handed to the node's agent, not waited for: the lane's slot is free for the next
        # lane at once instead of after a durable commit (a disk flush). The agent retries
        # an unreachable store; if it dies first, the leases run out and the tasks run again
        # (at-least-once execution; the fence keeps the commit once).
        self.store.commit_later(successes, failures)
        self.report += [(str(t), "committing", s) for t, s in seconds.items()]


def warm(agent: Any, group: str, size: int, timeout_s: float) -> int:
    """A warm-up task: holds its worker process until ``size`` warm-up tasks of ``group``
    run at once on the node, so that Ray starts that many processes (each with this
    module imported) for lanes to reuse. Returns the process id."""
    ray.get(agent.barrier.remote(group, size, timeout_s))
    return os.getpid()


def execute_batch(
    agent: Any,
    leases: list[tuple[str, str]],
    heartbeat_interval_s: float = 10.0,
    lease_ttl_s: float = 30.0,
    gpu: bool = False,
) -> list[tuple[str, str, float]]:
    """Run a lane: leased tasks back to back, in order, in this process, every store call
    through the node's ``agent``.

    Returns, per task, (task id, what happened, seconds the handler ran): the scheduler
    learns from it how long tasks of each type take.
    """
    store = node_store(agent)
    return run_lane(
        store,
        agent._actor_id.hex(),
        [(uuid.UUID(task_id), uuid.UUID(lease_id)) for task_id, lease_id in leases],
        heartbeat_interval_s,
        lease_ttl_s,
        gpu,
    )


def run_lane(
    store: NodeStore,
    store_key: str,
    pairs: list[tuple[uuid.UUID, uuid.UUID]],
    heartbeat_interval_s: float,
    lease_ttl_s: float,
    gpu: bool = False,
) -> list[tuple[str, str, float]]:
    lease_of = dict(pairs)
    group = _CommitGroup(store)
    try:
        started = with_retries(lambda: store.start_many(pairs, worker_id=worker_id()))
    except StoreUnavailableError:
        log.error("store unreachable: lane of %d task(s) not started", len(pairs))
        return [(str(task_id), "store_unavailable", 0.0) for task_id, _ in pairs]
    group.report += [(str(t), "lease_lost", 0.0) for t in started.refused]
    clock = _LaneClock(started.at)
    keeper = lease_keeper(store_key, store, heartbeat_interval_s, lease_ttl_s)
    keeper.hold((task.id, lease_of[task.id]) for task in started.tasks)
    try:
        for task in started.tasks:
            outcome = _run_one(store, task, lease_of[task.id], clock)
            keeper.release([task.id])
            group.add(outcome)
            if gpu:
                free_gpu_memory()
        group.flush()
    finally:
        keeper.release(lease_of)
    return group.report
