"""The scheduler as a named, detached Ray actor that Ray restarts when it fails.

It reserves no CPU (its work is I/O and bookkeeping), holds the leader lease
before it leases anything, and rebuilds its view from the store after a
restart: executors commit their own outcomes, so nothing is lost meanwhile.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from taskray.scheduler.cluster import NAMESPACE
from taskray.scheduler.core import Scheduler, SchedulerConfig
from taskray.store import Store

log = logging.getLogger(__name__)

SCHEDULER_NAME = "taskray-scheduler"


class _SchedulerActor:
    def __init__(self, database_url: str, config: SchedulerConfig | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # Its loop retries every failed pass, so no pre-ping per transaction; its writes are
        # all ones a server crash may lose without harm (Store.relaxed_commits).
        self._store = Store.open(
            database_url,
            migrate=False,
            relaxed_commits=True,
            engine_options=None
            if database_url.startswith("sqlite")
            else {"pool_pre_ping": False, "pool_size": 2, "max_overflow": 2},
        )
        # The actor id survives restarts: a restarted incarnation takes the lease over at
        # once (with a new epoch) instead of waiting for its predecessor's to run out.
        holder = f"actor:{ray.get_runtime_context().get_actor_id()}"
        self._scheduler = Scheduler(self._store, database_url, config, holder=holder)
        self._thread = threading.Thread(
            target=self._scheduler.run, name="taskray-scheduler", daemon=True
        )
        self._thread.start()

    def ready(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        """New work was just submitted (the embedded SDK says so on SQLite, which has no
        notifications): run a pass now instead of at the next poll."""
        self._scheduler.wake()

    def status(self) -> dict[str, Any]:
        return self._scheduler.status() | {"running": self._thread.is_alive()}

    def stop(self) -> None:
        self._scheduler.stop()
        self._thread.join(timeout=10)
        self._scheduler.resign()
        self._store.close()


# Applied as a call, not a decorator: Ray's stubs do not know max_concurrency.
SchedulerActor: Any = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=4)(  # type: ignore[call-overload]
    _SchedulerActor
)


def start_scheduler(
    database_url: str,
    config: SchedulerConfig | None = None,
    *,
    name: str = SCHEDULER_NAME,
    detached: bool = True,
) -> Any:
    """Start the scheduler actor, or return the one already running under ``name``."""
    options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    handle = SchedulerActor.options(**options).remote(database_url, config)
    ray.get(handle.ready.remote())
    return handle


def stop_scheduler(name: str = SCHEDULER_NAME) -> bool:
    """Stop the named scheduler (giving up its leader lease) and remove the actor."""
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(handle.stop.remote(), timeout=30)
    finally:
        ray.kill(handle, no_restart=True)
    return True
