"""The node agent: one per node, the node's connection pool and the executors' way to the store.

Executors run in Ray's worker processes, and a node can have dozens of them; if each
opened its own connection pool, a cluster would hold connections by the hundred and
exhaust PostgreSQL's ``max_connections``. Instead the scheduler starts one small actor
per node (no CPU reserved), and every executor on that node makes its store calls
through it: connections grow with nodes, not with worker processes. The agent is also
where the database URL lives on a node, so it never travels as a Ray task's argument.

The agent opens its store lazily (a restarted agent must come up even while the
database is down) and each call retries on a fresh connection after a dropped one.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import ray
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from taskray.errors import StoreUnavailableError
from taskray.models import (
    BatchCommit,
    Failure,
    StartedBatch,
    Success,
    Task,
    TaskState,
    check_result_size,
)

if TYPE_CHECKING:
    # Executors import this module in every worker process: the store (SQLAlchemy,
    # psycopg) is imported only where the agent opens it.
    from taskray.store import Store, TransactionalWrite

log = logging.getLogger(__name__)

#: The node's connections: enough for lanes committing at once; a group commit holds one
#: for a few milliseconds.
#: How long a store call is retried while the store cannot be reached; after that the
#: leases run out and the reaper retries the tasks.
STORE_RETRY_DEADLINE_S = 60.0

T = TypeVar("T")


def store_backoff(max_s: float = 2.0) -> wait_base:
    """Waits between tries to reach the store: 0.1 s doubling to ``max_s``, plus a little
    jitter. Capped low, so that a store that is back is used within about ``max_s``."""
    return wait_exponential(multiplier=0.1, max=max_s) + wait_random(0, 0.1)


def with_retries(call: Callable[[], T]) -> T:
    """``call()``, again on a fresh connection while the store cannot be reached."""
    for attempt in Retrying(
        retry=retry_if_exception_type(StoreUnavailableError),
        wait=store_backoff(),
        stop=stop_after_delay(STORE_RETRY_DEADLINE_S),
        reraise=True,
    ):
        with attempt:
            return call()
    raise AssertionError("unreachable")


AGENT_POOL: dict[str, Any] = {
    "pool_size": 4,
    "max_overflow": 4,
    "pool_pre_ping": False,
    # So that an operator (and a test) can tell the agents' connections apart.
    "connect_args": {"application_name": "taskray-node-agent"},
}


class _NodeAgent:
    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._arrivals: dict[str, int] = {}
        self._arrived = threading.Condition()

    def _open(self) -> Store:
        from taskray.store import Store

        with self._lock:
            if self._store is None:
                options = None if self._database_url.startswith("sqlite") else AGENT_POOL
                self._store = Store.open(
                    self._database_url,
                    migrate=False,
                    engine_options=options,
                    relaxed_commits=True,
                )
            return self._store

    def ready(self) -> bool:
        return True

    def open(self) -> bool:
        """Open the store now (the scheduler warms its nodes when it starts), so the first
        lane does not wait for it; False, not an error, while the store is unreachable:
        each later call opens it again."""
        try:
            self._open()
        except Exception:  # unreachable, or not migrated yet: the first real call says why
            log.warning("node agent: the store did not open; it opens on first use", exc_info=True)
            return False
        return True

    def barrier(self, group: str, size: int, timeout_s: float) -> bool:
        """Returns when ``size`` callers of ``group`` have arrived (or after ``timeout_s``):
        warm-up tasks wait here so that each holds a worker process of its own."""
        with self._arrived:
            self._arrivals[group] = self._arrivals.get(group, 0) + 1
            self._arrived.notify_all()
            return self._arrived.wait_for(lambda: self._arrivals[group] >= size, timeout=timeout_s)

    def max_payload_bytes(self) -> int:
        return self._open().max_payload_bytes

    def start_many(
        self, leases: Sequence[tuple[uuid.UUID, uuid.UUID]], worker_id: str | None
    ) -> StartedBatch:
        return self._open().start_many(leases, worker_id=worker_id)

    def heartbeat_many(
        self, leases: Sequence[tuple[uuid.UUID, uuid.UUID]], ttl_s: float | None
    ) -> BatchCommit:
        return self._open().heartbeat_many(leases, ttl_s=ttl_s)

    def complete_many(self, successes: Sequence[Success]) -> BatchCommit:
        return self._open().complete_many(successes)

    def fail_many(self, failures: Sequence[Failure]) -> dict[uuid.UUID, TaskState | None]:
        return self._open().fail_many(failures)

    def commit(self, successes: Sequence[Success], failures: Sequence[Failure]) -> int:
        """A lane's outcomes, sent without waiting: committed here, retried while the store
        is unreachable (up to ``STORE_RETRY_DEADLINE_S``); how many committed."""
        store = self._open()
        committed = 0
        if successes:
            committed += len(with_retries(lambda: store.complete_many(successes)).committed)
        if failures:
            states = with_retries(lambda: store.fail_many(failures))
            committed += sum(1 for state in states.values() if state is not None)
        return committed

    def complete(
        self, task_id: uuid.UUID, lease_id: uuid.UUID, result: Any, write: TransactionalWrite
    ) -> Task:
        # ``write`` is the handler's own code (shipped by Ray with cloudpickle from the
        # executor that ran it, a trusted process): it joins the result's transaction here.
        return self._open().complete(task_id, lease_id, result, write=write)

    def get_function(self, digest: str) -> bytes:
        return self._open().get_function(digest)

    def upstreams(self, task_id: uuid.UUID) -> list[uuid.UUID]:
        return self._open().upstreams(task_id)

    def get(self, task_id: uuid.UUID) -> Task:
        return self._open().get(task_id)


# Applied as a call, not a decorator: Ray's stubs do not know max_concurrency.
NodeAgent: Any = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=64)(  # type: ignore[call-overload]
    _NodeAgent
)


class NodeStore:
    """The store as an executor sees it: the node agent's calls, with the store's errors
    (a lost lease, an unreachable store) raised here as the store would raise them."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self._max_payload_bytes: int | None = None

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return ray.get(getattr(self.agent, method).remote(*args))
        except ray.exceptions.RayTaskError as exc:
            # The agent raised: raise what it raised (LeaseLostError, StoreUnavailableError,
            # PayloadTooLargeError...), not Ray's wrapper around it.
            raise exc.cause from None
        except ray.exceptions.RayActorError:
            raise StoreUnavailableError("the node agent is unavailable") from None

    @property
    def max_payload_bytes(self) -> int:
        if self._max_payload_bytes is None:
            self._max_payload_bytes = int(self._call("max_payload_bytes"))
        return self._max_payload_bytes

    def check_result(self, result: Any) -> None:
        check_result_size(result, self.max_payload_bytes)

    def start_many(
        self, leases: Sequence[tuple[uuid.UUID, uuid.UUID]], *, worker_id: str | None = None
    ) -> StartedBatch:
        started: StartedBatch = self._call("start_many", list(leases), worker_id)
        return started

    def heartbeat_many(
        self, leases: Sequence[tuple[uuid.UUID, uuid.UUID]], *, ttl_s: float | None = None
    ) -> BatchCommit:
        renewed: BatchCommit = self._call("heartbeat_many", list(leases), ttl_s)
        return renewed

    def complete_many(self, successes: Sequence[Success]) -> BatchCommit:
        done: BatchCommit = self._call("complete_many", list(successes))
        return done

    def commit_later(self, successes: Sequence[Success], failures: Sequence[Failure]) -> None:
        """Hand outcomes to the agent to commit, without waiting for it."""
        self.agent.commit.remote(list(successes), list(failures))

    def fail_many(self, failures: Sequence[Failure]) -> dict[uuid.UUID, TaskState | None]:
        states: dict[uuid.UUID, TaskState | None] = self._call("fail_many", list(failures))
        return states

    def complete(
        self,
        task_id: uuid.UUID,
        lease_id: uuid.UUID,
        result: Any = None,
        *,
        write: TransactionalWrite | None = None,
    ) -> Task:
        task: Task = self._call("complete", task_id, lease_id, result, write)
        return task

    def get_function(self, digest: str) -> bytes:
        blob: bytes = self._call("get_function", digest)
        return blob

    def upstreams(self, task_id: uuid.UUID) -> list[uuid.UUID]:
        ids: list[uuid.UUID] = self._call("upstreams", task_id)
        return ids

    def get(self, task_id: uuid.UUID) -> Task:
        task: Task = self._call("get", task_id)
        return task
