"""The leader loop: read ready tasks, ask the policy, lease, dispatch to Ray, watch.

One pass of the loop is :meth:`Scheduler.tick`. Decisions come from
``taskray.policy``; every Ray call goes through ``taskray.scheduler.cluster``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from taskray.errors import LeaseLostError, NotLeaderError, StoreUnavailableError
from taskray.models import LeaseRequest, Task, TaskState
from taskray.policy.placement import place
from taskray.policy.types import (
    NODE_SELECTOR_PREFIX,
    NodeView,
    PlacementPlan,
    PlacementRequest,
    Release,
    TaskDemand,
)
from taskray.scheduler import cluster
from taskray.store import Store

log = logging.getLogger(__name__)

Placer = Callable[[PlacementRequest], PlacementPlan]
#: How long Ray's per-node view may take to show what a finished task gave back (measured
#: under a second here); within it, taskray counts such resources free on Ray's side too.
RAY_VIEW_LAG_S = 1.0


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    #: How many ready tasks one pass considers (highest priority first).
    window: int = 256
    lease_ttl_s: float = 30.0
    heartbeat_interval_s: float = 10.0
    leader_ttl_s: float = 15.0
    reap_interval_s: float = 5.0
    #: Longest wait between passes when nothing runs and nothing is due.
    idle_wait_s: float = 1.0
    #: SQLite has no notifications: how often an idle scheduler looks for new work.
    poll_interval_s: float = 0.1
    #: Longest wait on running tasks before looking for new work again.
    watch_interval_s: float = 0.05
    queues: tuple[str, ...] | None = None


@dataclass
class TickReport:
    leader: bool = False
    dispatched: int = 0
    finished: int = 0
    timed_out: int = 0
    reaped: int = 0
    waiting: int = 0
    infeasible: list[uuid.UUID] = field(default_factory=list)


def demand_of(task: Task) -> TaskDemand:
    return TaskDemand(
        task_id=task.id,
        priority=task.priority,
        demand=task.resources.as_dict(),
        ready_since=task.scheduled_at,
        # The timeout bounds the run: enough for backfill to plan on (EASY backfill).
        expected_duration_s=task.timeout_s,
        node_selector={
            key[len(NODE_SELECTOR_PREFIX) :]: value
            for key, value in task.labels.items()
            if key.startswith(NODE_SELECTOR_PREFIX)
        },
    )


def _releases_by_node(live: list[Task]) -> dict[str, list[Release]]:
    """When each live task with a timeout gives its resources back, at the latest."""
    releases: dict[str, list[Release]] = defaultdict(list)
    for task in live:
        began = task.started_at or task.leased_at
        if task.node_id is None or task.timeout_s is None or began is None:
            continue
        releases[task.node_id].append(
            Release(
                at=began + timedelta(seconds=task.timeout_s), resources=task.resources.as_dict()
            )
        )
    return releases


def _usage_by_node(live: list[Task]) -> dict[str, dict[str, float]]:
    usage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for task in live:
        if task.node_id is None:
            continue
        for name, amount in task.resources.as_dict().items():
            usage[task.node_id][name] += amount
    return usage


class Scheduler:
    """Leases ready tasks onto Ray nodes and watches them until they end."""

    def __init__(
        self,
        store: Store,
        database_url: str,
        config: SchedulerConfig | None = None,
        *,
        holder: str | None = None,
        placer: Placer = place,
    ) -> None:
        self.store = store
        self.database_url = database_url
        self.config = config or SchedulerConfig()
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.placer = placer
        self.epoch: int | None = None
        self.in_flight: dict[uuid.UUID, cluster.Dispatched] = {}
        self._leader_renewed_at = float("-inf")
        self._reaped_at = float("-inf")
        self._stop = threading.Event()
        self._next_due: datetime | None = None
        self.last_report = TickReport()
        self.totals: dict[str, int] = defaultdict(int)
        #: (monotonic time, node, resources) of tasks that just ended: Ray's view of the
        #: node shows them free only a little later.
        self._released: deque[tuple[float, str, dict[str, float]]] = deque()

    # -- one pass ---------------------------------------------------------------------------

    def tick(self) -> TickReport:
        report = TickReport()
        if not self._hold_leadership():
            self.last_report = report
            return report
        report.leader = True
        report.finished = self._collect_finished(timeout_s=0.0)
        now = self.store.now()
        live = self.store.live_tasks()
        report.timed_out = self._enforce_timeouts(live, now)
        self._hold_pending_leases(live, now)
        self._stop_orphans(live)
        if time.monotonic() - self._reaped_at >= self.config.reap_interval_s:
            report.reaped = len(self.store.reap())
            self._reaped_at = time.monotonic()
            if report.reaped:
                live = self.store.live_tasks()
        ready = self.store.candidates(self.config.window, queues=self.config.queues)
        if ready:
            nodes = cluster.read_nodes(
                _usage_by_node(live), _releases_by_node(live), self._recently_released()
            )
            report.dispatched, plan = self._place_and_dispatch(ready, nodes, now)
            report.waiting = len(plan.waiting)
            report.infeasible = list(plan.infeasible)
        self._next_due = None if ready else self.store.next_scheduled_at(queues=self.config.queues)
        for key in ("dispatched", "timed_out", "reaped"):
            self.totals[key] += getattr(report, key)
        self.last_report = report
        return report

    def _hold_leadership(self) -> bool:
        renew_every = self.config.leader_ttl_s / 3
        if self.epoch is None or time.monotonic() - self._leader_renewed_at >= renew_every:
            epoch = self.store.acquire_leadership(
                self.holder, ttl_s=self.config.leader_ttl_s, fresh=self.epoch is None
            )
            if epoch != self.epoch and epoch is not None:
                log.info("scheduler %s leads with epoch %d", self.holder, epoch)
            self.epoch = epoch
            self._leader_renewed_at = time.monotonic()
        return self.epoch is not None

    def _place_and_dispatch(
        self, ready: list[Task], nodes: list[NodeView], now: datetime
    ) -> tuple[int, PlacementPlan]:
        plan = self.placer(
            PlacementRequest(tasks=[demand_of(t) for t in ready], nodes=nodes, now=now)
        )
        if not plan.placements:
            return 0, plan
        try:
            leases = self.store.lease(
                [LeaseRequest(p.task_id, p.node_id) for p in plan.placements],
                epoch=self.epoch,
                ttl_s=self.config.lease_ttl_s,
            )
        except NotLeaderError:
            log.warning("scheduler %s lost the leader lease; standing by", self.holder)
            self.epoch = None
            return 0, plan
        for lease in leases:
            assert lease.task.node_id is not None
            self.in_flight[lease.task.id] = cluster.dispatch(
                lease.task,
                lease.lease_id,
                lease.task.node_id,
                self.database_url,
                heartbeat_interval_s=self.config.heartbeat_interval_s,
                lease_ttl_s=self.config.lease_ttl_s,
            )
        return len(leases), plan

    def _collect_finished(self, timeout_s: float) -> int:
        ended = cluster.finished(list(self.in_flight.values()), timeout_s)
        for dispatched in ended:
            self.in_flight.pop(dispatched.task_id, None)
            self._released.append((time.monotonic(), dispatched.node_id, dispatched.resources))
            _reported, ray_error = cluster.outcome(dispatched)
            if ray_error is None or dispatched.stopped_because is not None:
                continue
            # The executor could not report (its worker or node died): record the attempt.
            log.warning("task %s ended in Ray without a commit: %s", dispatched.task_id, ray_error)
            # LeaseLost: it committed before the worker went away, or was already reaped.
            with contextlib.suppress(LeaseLostError):
                self.store.fail(dispatched.task_id, dispatched.lease_id, ray_error, retryable=True)
        self.totals["finished"] += len(ended)
        return len(ended)

    def _hold_pending_leases(self, live: list[Task], now: datetime) -> None:
        """Renew the leases of tasks dispatched but not started yet.

        Until its executor starts (and heartbeats), a task waits in Ray for a worker, which
        can take seconds on a busy node; the scheduler vouches for it meanwhile, so its
        lease does not run out and get it reaped and run twice.
        """
        renew_before = now + timedelta(seconds=self.config.lease_ttl_s / 2)
        for task in live:
            dispatched = self.in_flight.get(task.id)
            if (
                task.status is TaskState.LEASED
                and dispatched is not None
                and dispatched.lease_id == task.lease_id
                and task.lease_expires_at is not None
                and task.lease_expires_at < renew_before
            ):
                with contextlib.suppress(LeaseLostError):
                    self.store.heartbeat(
                        task.id, dispatched.lease_id, ttl_s=self.config.lease_ttl_s
                    )

    def _recently_released(self) -> dict[str, dict[str, float]]:
        horizon = time.monotonic() - RAY_VIEW_LAG_S
        while self._released and self._released[0][0] < horizon:
            self._released.popleft()
        released: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for _when, node_id, resources in self._released:
            for name, amount in resources.items():
                released[node_id][name] += amount
        return released

    def _enforce_timeouts(self, live: list[Task], now: datetime) -> int:
        count = 0
        for task in live:
            if task.timeout_s is None or task.started_at is None:
                continue
            if now < task.started_at + timedelta(seconds=task.timeout_s):
                continue
            dispatched = self.in_flight.get(task.id)
            if dispatched is not None and dispatched.lease_id == task.lease_id:
                cluster.cancel(dispatched, "timeout")
            assert task.lease_id is not None
            try:
                self.store.fail(
                    task.id,
                    task.lease_id,
                    f"TimeoutError: timed out after {task.timeout_s:g}s",
                    retryable=True,
                )
                count += 1
            except LeaseLostError:
                pass
        return count

    def _stop_orphans(self, live: list[Task]) -> None:
        """Stop Ray tasks whose lease is gone (cancelled, or reaped and leased again)."""
        live_leases = {t.id: t.lease_id for t in live}
        stale = [
            d
            for d in self.in_flight.values()
            if d.stopped_because is None and live_leases.get(d.task_id) != d.lease_id
        ]
        if not stale:
            return
        states = {t.id: t for t in self.store.get_many([d.task_id for d in stale])}
        for dispatched in stale:
            task = states[dispatched.task_id]
            # A task that succeeded or failed on its own is just finishing; leave it be.
            if task.status is TaskState.CANCELLED or (
                task.status.is_live and task.lease_id != dispatched.lease_id
            ):
                cluster.cancel(dispatched, f"lease gone ({task.status.value})")

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Pass after pass until :meth:`stop`; waits on running tasks or for new work."""
        listener = self.store.listener(self.config.poll_interval_s)
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except StoreUnavailableError as exc:
                    log.warning("store unavailable: %s; retrying", exc.message)
                    self._stop.wait(1.0)
                    continue
                if self._stop.is_set():
                    break
                if self.in_flight:
                    self._collect_finished(timeout_s=self.config.watch_interval_s)
                    listener.wait(0.0)
                elif self.last_report.waiting:
                    # Ready tasks found no room while nothing of ours runs: room held by Ray's
                    # lagging view or by others' work frees up without any notification.
                    listener.wait(self.config.watch_interval_s)
                else:
                    listener.wait(self._idle_wait())
        finally:
            listener.close()

    def _idle_wait(self) -> float:
        wait = self.config.idle_wait_s
        if self.epoch is None:
            return min(wait, self.config.leader_ttl_s / 3)
        if self._next_due is not None:
            until_due = (self._next_due - self.store.now()).total_seconds()
            wait = min(wait, max(0.0, until_due))
        return wait

    def stop(self) -> None:
        self._stop.set()

    def resign(self) -> None:
        if self.epoch is not None:
            self.store.release_leadership(self.holder)
            self.epoch = None

    def status(self) -> dict[str, object]:
        return {
            "holder": self.holder,
            "epoch": self.epoch,
            "in_flight": len(self.in_flight),
            "totals": dict(self.totals),
            "last": {
                "waiting": self.last_report.waiting,
                "infeasible": [str(t) for t in self.last_report.infeasible],
            },
        }
