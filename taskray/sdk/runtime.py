"""``taskray.init()`` and ``taskray.shutdown()``: what the SDK is connected to."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray

from taskray.errors import InvalidTaskError, NotInitializedError, RemoteModeUnavailableError
from taskray.models import Attempt, SubmitResult, Task, TaskSpec
from taskray.registry import TASK_MODULES_ENV
from taskray.scheduler.actor import SCHEDULER_NAME, start_scheduler, stop_scheduler
from taskray.scheduler.core import SchedulerConfig
from taskray.sdk.remote import RemoteBackend
from taskray.store import Store, default_database_url
from taskray.store.engine import normalise_url, redacted

log = logging.getLogger(__name__)

#: How long the SDK trusts its view of the cluster's nodes (``ray.nodes()`` costs about a
#: millisecond, far more on a busy cluster, and every submit consults it).
NODE_TOTALS_MAX_AGE_S = 5.0


class TaskBackend(Protocol):
    """What the SDK needs of a store: the store itself, or the REST API in remote mode."""

    def submit_many(self, specs: Iterable[TaskSpec]) -> list[SubmitResult]: ...
    def get(self, task_id: uuid.UUID | str) -> Task: ...
    def get_many(self, task_ids: Iterable[uuid.UUID | str]) -> list[Task]: ...
    def attempts(self, task_id: uuid.UUID | str) -> list[Attempt]: ...
    def cancel(self, task_id: uuid.UUID | str) -> Task: ...
    def upstreams(self, task_id: uuid.UUID | str) -> Sequence[uuid.UUID]: ...
    def put_function(self, digest: str, name: str, blob: bytes) -> None: ...
    def close(self) -> None: ...


@dataclass
class Runtime:
    """What ``init`` connected to, and what it started (so ``shutdown`` stops only that)."""

    store: TaskBackend
    database_url: str
    started_ray: bool
    scheduler: Any | None
    scheduler_name: str
    #: Remote mode: the REST API stands between the SDK and the store (JSON only).
    remote: bool = False
    #: SQLite has no notifications: the SDK tells its scheduler about new work itself.
    wakes_scheduler: bool = False

    @property
    def embedded(self) -> bool:
        return self.started_ray

    def work_submitted(self) -> None:
        """Wake the scheduler at once (a message to its actor, not waited on)."""
        if self.wakes_scheduler and self.scheduler is not None:
            self.scheduler.wake.remote()

    _nodes: tuple[float, list[dict[str, float]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _nodes_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def node_totals(self, max_age_s: float = NODE_TOTALS_MAX_AGE_S) -> list[dict[str, float]]:
        """Each alive node's declared resources, in Ray's names, as seen at most
        ``max_age_s`` seconds ago (0: ask Ray now)."""
        with self._nodes_lock:
            cached = self._nodes
            if cached is not None and time.monotonic() - cached[0] < max_age_s:
                return cached[1]
            totals = [
                dict(node["Resources"])
                for node in ray.nodes()  # type: ignore[no-untyped-call]
                if node.get("Alive")
            ]
            self._nodes = (time.monotonic(), totals)
            return totals


_runtime: Runtime | None = None
_lock = threading.Lock()


def init(
    database_url: str | None = None,
    ray_address: str | None = None,
    *,
    url: str | None = None,
    api_key: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: dict[str, float] | None = None,
    runtime_env: dict[str, Any] | None = None,
    log_to_driver: bool = True,
    start_scheduler_actor: bool = True,
    scheduler_config: SchedulerConfig | None = None,
) -> Runtime:
    """Connect the SDK.

    With no arguments: the embedded default, a local Ray, a SQLite database under your
    data directory (``TASKRAY_DATABASE_URL`` overrides it) and the scheduler actor in that
    Ray. ``url`` and ``api_key`` talk to a taskray REST API instead (remote mode: tasks by
    name, JSON arguments). ``database_url`` and ``ray_address`` join a cluster. Calling
    ``init`` again returns the runtime already running.
    """
    global _runtime
    if url is not None or api_key is not None:
        return _init_remote(url, api_key)
    with _lock:
        if _runtime is not None:
            if database_url is not None and normalise_url(database_url) != normalise_url(
                _runtime.database_url
            ):
                raise InvalidTaskError(
                    "taskray is already initialised with another database; "
                    "call taskray.shutdown() first"
                )
            return _runtime
        database_url = database_url or default_database_url()
        is_sqlite = normalise_url(database_url).get_backend_name() == "sqlite"
        store = Store.open(database_url)
        started_ray = False
        try:
            if not ray.is_initialized():
                if ray_address is not None:
                    ray.init(
                        address=ray_address,
                        runtime_env=_with_task_modules(runtime_env),
                        logging_level=logging.WARNING,
                    )
                else:
                    ray.init(
                        address="local",
                        num_cpus=num_cpus,
                        num_gpus=num_gpus,
                        resources=resources,
                        include_dashboard=False,
                        runtime_env=runtime_env,
                        logging_level=logging.WARNING,
                        log_to_driver=log_to_driver,
                    )
                    started_ray = True
            alive = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
            if is_sqlite and len(alive) > 1:
                raise InvalidTaskError(
                    f"this Ray has {len(alive)} nodes, but SQLite serves one machine only: point "
                    "taskray at PostgreSQL (database_url=... or TASKRAY_DATABASE_URL)"
                )
            scheduler = None
            if start_scheduler_actor:
                # An embedded scheduler lives and dies with this driver; on a cluster it is
                # detached, shared by every client, and restarted by Ray.
                scheduler = start_scheduler(
                    database_url, scheduler_config, detached=not started_ray
                )
        except BaseException:
            store.close()
            if started_ray:
                ray.shutdown()
            raise
        _runtime = Runtime(
            store, database_url, started_ray, scheduler, SCHEDULER_NAME, wakes_scheduler=is_sqlite
        )
        log.info("taskray connected to %s", redacted(database_url))
        return _runtime


def _with_task_modules(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """``runtime_env`` carrying this process's ``TASKRAY_TASK_MODULES`` to every worker of
    the cluster's Ray job it joins: the scheduler actor this client starts, and the
    executors it dispatches, run with the same task modules as this client, whatever the
    nodes' own environment says. A value set in ``runtime_env`` wins. (A local Ray started
    here needs none of this: its workers inherit this process's environment.)"""
    modules = os.environ.get(TASK_MODULES_ENV)
    if not modules:
        return runtime_env
    merged = dict(runtime_env or {})
    env_vars = dict(merged.get("env_vars") or {})
    env_vars.setdefault(TASK_MODULES_ENV, modules)
    merged["env_vars"] = env_vars
    return merged


def _init_remote(url: str | None, api_key: str | None) -> Runtime:
    global _runtime
    if not url or not api_key:
        raise RemoteModeUnavailableError("remote mode needs both url=... and api_key=...")
    with _lock:
        if _runtime is not None:
            if _runtime.remote and _runtime.database_url == url:
                return _runtime
            raise InvalidTaskError("taskray is already initialised; call taskray.shutdown() first")
        backend = RemoteBackend(url, api_key)
        try:
            backend.check()
        except BaseException:
            backend.close()
            raise
        _runtime = Runtime(backend, url, False, None, SCHEDULER_NAME, remote=True)
        return _runtime


def shutdown() -> None:
    """Stop what ``init`` started: the embedded scheduler and local Ray. Harmless twice."""
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
    if runtime is None:
        return
    try:
        if runtime.scheduler is not None and runtime.started_ray:
            stop_scheduler(runtime.scheduler_name)
    finally:
        runtime.store.close()
        if runtime.started_ray:
            ray.shutdown()


def current() -> Runtime:
    if _runtime is None:
        raise NotInitializedError()
    return _runtime


def is_initialized() -> bool:
    return _runtime is not None
