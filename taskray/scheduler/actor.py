"""The scheduler as a named, detached Ray actor that Ray restarts when it fails.

It reserves no CPU (its work is I/O and bookkeeping), holds the leader lease
before it leases anything, and rebuilds its view from the store after a
restart: executors commit their own outcomes, so nothing is lost meanwhile.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import ray
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
)

from taskray.errors import MigrationError, StoreUnavailableError
from taskray.node import store_backoff
from taskray.scheduler.cluster import NAMESPACE
from taskray.scheduler.core import Scheduler, SchedulerConfig
from taskray.store import Store

log = logging.getLogger(__name__)

SCHEDULER_NAME = "taskray-scheduler"
#: Longest wait between two tries to reach the store at start-up: short, so the scheduler
#: is back within seconds of the database.
STORE_WAIT_MAX_S = 1.0
#: How long ``warmed`` waits for the store to open before it gives up on the warm-up.
STORE_OPEN_WAIT_S = 5.0
#: How many actors ``start_scheduler`` starts, at most, when those it finds die.
START_ATTEMPTS = 5
#: How long ``start_scheduler`` waits for an actor that Ray is restarting.
READY_TIMEOUT_S = 120.0


class _SchedulerActor:
    def __init__(self, database_url: str, config: SchedulerConfig | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self._database_url = database_url
        self._config = config
        # The actor id survives restarts: a restarted incarnation takes the lease over at
        # once (with a new epoch) instead of waiting for its predecessor's to run out.
        self._holder = f"actor:{ray.get_runtime_context().get_actor_id()}"
        self._store: Store | None = None
        self._scheduler: Scheduler | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._scheduler_made = threading.Event()
        # Nothing here touches the database: an __init__ that raised (the database down
        # while Ray restarts the actor) would leave the actor DEAD for good. The thread
        # waits for the database instead.
        self._thread = threading.Thread(target=self._run, name="taskray-scheduler", daemon=True)
        self._thread.start()

    def _open_store(self) -> Store | None:
        """The store, once the database can be reached (None if stopped first)."""
        retrying = Retrying(
            retry=retry_if_exception_type((StoreUnavailableError, MigrationError)),
            wait=store_backoff(STORE_WAIT_MAX_S),
            stop=lambda _state: self._stopping.is_set(),
            sleep=self._pause,
            before_sleep=_log_store_wait,
            retry_error_callback=lambda _state: None,
        )
        opened: Store | None = retrying(
            Store.open,
            self._database_url,
            migrate=False,
            # Its loop retries every failed pass, so no pre-ping per transaction; its
            # writes are all ones a server crash may lose without harm
            # (Store.relaxed_commits).
            relaxed_commits=True,
            engine_options=None
            if self._database_url.startswith("sqlite")
            else {"pool_pre_ping": False, "pool_size": 2, "max_overflow": 2},
        )
        return opened

    def _pause(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _run(self) -> None:
        try:
            store = self._open_store()
            with self._lock:
                if store is None or self._stopping.is_set():
                    if store is not None:
                        store.close()
                    return
                self._store = store
                self._scheduler = Scheduler(
                    store, self._database_url, self._config, holder=self._holder
                )
            self._scheduler_made.set()
            self._scheduler.run()
        except BaseException:
            log.exception("the scheduler loop failed")
        finally:
            if not self._stopping.is_set():
                # A loop that stopped on its own would leave a live actor that schedules
                # nothing, which Ray would never restart: end the process so that it does.
                log.critical("the scheduler loop ended unexpectedly; restarting the actor")
                os._exit(1)

    def ready(self) -> bool:
        return self._thread.is_alive()

    def warmed(self, timeout_s: float) -> bool:
        """Whether the nodes' worker processes and agents are up (waits up to ``timeout_s``,
        the store's opening included)."""
        deadline = time.monotonic() + timeout_s
        # The store opens in well under a second when the database is up; while it is
        # down, start-up does not wait for a warm-up that cannot begin.
        if not self._scheduler_made.wait(min(timeout_s, STORE_OPEN_WAIT_S)):
            return False
        if self._scheduler is None:
            return False
        return self._scheduler.warmed(max(0.0, deadline - time.monotonic()))

    def wake(self) -> None:
        """New work was just submitted (the embedded SDK says so on SQLite, which has no
        notifications): run a pass now instead of at the next poll."""
        if self._scheduler is not None:
            self._scheduler.wake()

    def status(self) -> dict[str, Any]:
        running = self._thread.is_alive()
        if self._scheduler is None:
            return {"holder": self._holder, "epoch": None, "store": "waiting", "running": running}
        return self._scheduler.status() | {"store": "open", "running": running}

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            scheduler, store = self._scheduler, self._store
        if scheduler is not None:
            scheduler.stop()
        self._thread.join(timeout=10)
        if scheduler is not None:
            scheduler.resign()
        if store is not None:
            store.close()


def _log_store_wait(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    log.warning(
        "waiting for the store (%s); retrying in %.1f s",
        getattr(error, "message", error),
        state.upcoming_sleep,
    )


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
    """Start the scheduler actor, or return the one already running under ``name``.

    Never a dead one: an actor looked up while Ray restarts it can die a moment later
    (its restart failed); the name is then free, and a new actor is started under it.
    """
    options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    for attempt in Retrying(
        retry=retry_if_exception_type(ray.exceptions.ActorDiedError),
        wait=store_backoff(2.0),
        stop=stop_after_attempt(START_ATTEMPTS),
        reraise=True,
    ):
        with attempt:
            handle = SchedulerActor.options(**options).remote(database_url, config)
            _wait_ready(handle)
    # Returns once the nodes are warm, so that the first tasks find worker processes
    # started rather than waiting seconds for Ray to start them.
    ray.get(handle.warmed.remote((config or SchedulerConfig()).warm_timeout_s))
    return handle


def _wait_ready(handle: Any) -> None:
    """Until the actor answers; ``ActorDiedError`` if it is dead."""
    for attempt in Retrying(
        # Restarting: Ray refuses calls until the new incarnation is up.
        retry=retry_if_exception_type(ray.exceptions.ActorUnavailableError),
        wait=store_backoff(1.0),
        stop=stop_after_delay(READY_TIMEOUT_S),
        reraise=True,
    ):
        with attempt:
            ray.get(handle.ready.remote())


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
