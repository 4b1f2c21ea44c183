"""The leader loop: read ready tasks, ask the policy, lease, dispatch to Ray, watch.

One pass of the loop is :meth:`Scheduler.tick`. Decisions come from
``taskray.policy``; every Ray call goes through ``taskray.scheduler.cluster``.

The loop is a pipeline, not a round trip per task:

- A pass reads a window of ready tasks without their payloads, sized from the free
  capacity, so its cost does not grow with the queue.
- Tasks run in *lanes*: one Ray task that holds one task's resources and runs several
  tasks of that shape back to back in a warm worker, as many as take about
  ``lane_target_s`` by the durations seen so far for their types (a task type not seen
  yet, a task with a timeout and a task that asks for a fresh process run alone).
- Each node may hold ``lease_ahead`` lanes beyond what it has free: they wait in Ray on
  that node and start the moment a slot frees, without waiting for a pass.
- What taskray placed on each node is kept in memory (the ledger of lanes), so a pass
  reads no live rows; the periodic services (reaper, timeouts, orphans) read only
  what they need, on their own intervals.
- The loop sleeps on one event, set by new work (LISTEN/NOTIFY on PostgreSQL, or the
  SDK's ``wake`` in embedded mode), by a lane that ended (a watcher thread waits on
  Ray), or by the next timer.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from taskray.errors import NotLeaderError, StoreUnavailableError
from taskray.models import Failure, ReadyTask, TaskState
from taskray.policy.placement import could_hold, place
from taskray.policy.types import (
    EPSILON,
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
#: Weight of the newest run in a task type's running mean duration.
_DURATION_WEIGHT = 0.2


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    #: The most ready tasks one pass reads (highest priority first); fewer when little is
    #: free, so a pass costs the same with a million tasks queued as with a thousand.
    window: int = 1024
    lease_ttl_s: float = 30.0
    heartbeat_interval_s: float = 10.0
    leader_ttl_s: float = 15.0
    reap_interval_s: float = 5.0
    #: How often running tasks are checked against their timeouts.
    timeout_interval_s: float = 0.25
    #: Longest wait between passes when nothing runs and nothing is due.
    idle_wait_s: float = 1.0
    #: SQLite has no notifications: how often an idle scheduler looks for new work that
    #: did not come from this Ray's SDK (which wakes the scheduler itself).
    poll_interval_s: float = 0.1
    #: How often the leases of running lanes are checked (a cancelled task is stopped), and
    #: how soon a pass is retried when ready tasks found no room.
    watch_interval_s: float = 0.05
    #: A lane runs tasks of one shape back to back for about this long (by the durations
    #: seen so far for their types), so a priority task waits at most about this long
    #: for a lane to end.
    lane_target_s: float = 0.25
    max_lane_tasks: int = 64
    #: Lanes each node may hold beyond what it has free, per CPU it has (they wait in Ray
    #: for a slot, and start the moment one frees, without waiting for a pass).
    lease_ahead: int = 1
    #: Only tasks whose type is known to take at most this long are leased ahead.
    ahead_max_s: float = 0.5
    queues: tuple[str, ...] | None = None
    #: Worker processes the leader starts on each node when it takes the lead (and on a
    #: node when it joins), with the executor imported and the node agent's store open, so
    #: the first tasks do not wait seconds for Ray to start processes: up to this many for
    #: CPU work (at most the node's CPUs less its GPUs: Ray keeps about as many idle
    #: workers as a node has CPUs) and one per GPU for GPU work. 0 turns warm-up off.
    warm_workers_per_node: int = 8
    #: How long warm-up tasks wait for each other before giving their worker back anyway.
    warm_timeout_s: float = 30.0


@dataclass
class TickReport:
    leader: bool = False
    dispatched: int = 0
    lanes: int = 0
    finished: int = 0
    timed_out: int = 0
    reaped: int = 0
    waiting: int = 0
    infeasible: list[uuid.UUID] = field(default_factory=list)


def demand_of(task: ReadyTask) -> TaskDemand:
    return TaskDemand(
        task_id=task.id,
        priority=task.priority,
        demand=task.resources.as_dict(),
        ready_since=task.scheduled_at,
        # The timeout bounds the run: enough for backfill to plan on (EASY backfill).
        expected_duration_s=task.timeout_s,
        node_selector=node_selector(task),
    )


def node_selector(task: ReadyTask) -> dict[str, str]:
    return {
        key[len(NODE_SELECTOR_PREFIX) :]: value
        for key, value in task.labels.items()
        if key.startswith(NODE_SELECTOR_PREFIX)
    }


def _shape(task: ReadyTask) -> tuple[Any, ...]:
    """Tasks of one shape can share a lane: same resources, node selector and worker."""
    return (
        tuple(sorted(task.resources.as_dict().items())),
        tuple(sorted(node_selector(task).items())),
        task.metadata.get(cluster.WORKER_METADATA_KEY),
    )


def _lane_alone(task: ReadyTask) -> bool:
    """A task with a timeout runs alone: stopping it must not stop others. So does one
    that asks for a fresh process."""
    return task.timeout_s is not None or cluster.wants_fresh_worker(task)


class _Timer:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last = float("-inf")

    def due(self, now: float) -> bool:
        if now - self.last >= self.interval_s:
            self.last = now
            return True
        return False

    def left(self, now: float) -> float:
        return max(0.0, self.last + self.interval_s - now)


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
        #: The ledger: every lane in flight, by its Ray object ref.
        self.lanes: dict[Any, cluster.Lane] = {}
        self._lanes_lock = threading.Lock()
        #: Refs the watcher saw end that the loop has not collected yet.
        self._ended: set[Any] = set()
        self._wake = threading.Event()
        self._lanes_changed = threading.Event()
        self._stop = threading.Event()
        self._leader_timer = _Timer(self.config.leader_ttl_s / 3)
        self._reap_timer = _Timer(self.config.reap_interval_s)
        self._timeout_timer = _Timer(self.config.timeout_interval_s)
        self._orphan_timer = _Timer(self.config.watch_interval_s * 5)
        self._vouch_timer = _Timer(self.config.lease_ttl_s / 4)
        self._next_due: datetime | None = None
        #: Database clock minus this host's clock, so the policy gets database time
        #: (DESIGN invariant 4) without a round trip per pass.
        self._clock_offset = timedelta(0)
        #: Running mean seconds per task type, as reported by the executors.
        self.durations: dict[str, float] = {}
        #: Resources held on each node by live tasks that are not in this scheduler's lanes
        #: (a previous incarnation's), rebuilt from the store by the reaper.
        self._foreign: dict[str, dict[str, float]] = {}
        self.last_report = TickReport()
        self.totals: dict[str, int] = defaultdict(int)
        #: (monotonic time, node, resources) of lanes that just ended: Ray's view of the
        #: node shows them free only a little later.
        self._released: deque[tuple[float, str, dict[str, float]]] = deque()
        #: The warm-up of each node this scheduler has warmed.
        self._warming: dict[str, cluster.Warming] = {}
        self._first_pass = threading.Event()
        #: Attempts of lanes that ended in Ray whose failure the store has not recorded yet
        #: (it could not be reached): recorded on a later pass.
        self._unrecorded: list[Failure] = []
        #: Whether the LISTEN connection is up, and how often it was opened.
        self.listener_connected = False
        self.listener_connects = 0
        #: The name of a service thread that stopped on its own (the loop then stops too).
        self._service_died: str | None = None

    # -- one pass ---------------------------------------------------------------------------

    def tick(self) -> TickReport:
        report = TickReport()
        if not self._hold_leadership():
            self.last_report = report
            self._first_pass.set()
            return report
        report.leader = True
        report.finished = self._collect_finished()
        now = time.monotonic()
        if self._reap_timer.due(now):
            report.reaped = len(self.store.reap())
            self._rebuild_foreign()
        if self._timeout_timer.due(now):
            report.timed_out = self._enforce_timeouts()
        if self._orphan_timer.due(now):
            self._stop_orphans()
        if self._vouch_timer.due(now):
            self._vouch_for_waiting_lanes()
        self._schedule(report)
        self._first_pass.set()
        for key in ("dispatched", "lanes", "timed_out", "reaped"):
            self.totals[key] += getattr(report, key)
        self.totals["passes"] += 1
        self.last_report = report
        return report

    def db_now(self) -> datetime:
        return datetime.now(UTC) + self._clock_offset

    def _hold_leadership(self) -> bool:
        if self.epoch is None or self._leader_timer.due(time.monotonic()):
            epoch = self.store.acquire_leadership(
                self.holder, ttl_s=self.config.leader_ttl_s, fresh=self.epoch is None
            )
            if epoch != self.epoch and epoch is not None:
                log.info("scheduler %s leads with epoch %d", self.holder, epoch)
                self._rebuild_foreign()
            self.epoch = epoch
            self._leader_timer.last = time.monotonic()
            self._clock_offset = self.store.now() - datetime.now(UTC)
        return self.epoch is not None

    def _rebuild_foreign(self) -> None:
        ours = {task_id for lane in self._lane_list() for task_id in lane.leases}
        foreign: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for task in self.store.live_tasks():
            if task.id in ours or task.node_id is None:
                continue
            for name, amount in task.resources.as_dict().items():
                foreign[task.node_id][name] += amount
        self._foreign = foreign

    def _lane_list(self) -> list[cluster.Lane]:
        with self._lanes_lock:
            return list(self.lanes.values())

    # -- placing ----------------------------------------------------------------------------

    def _ledger(self) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
        """What taskray holds on each node (its lanes there, and a predecessor's live
        tasks), and how many lanes wait ahead on each. A lane waiting ahead holds nothing
        yet: counting it would hide resources free now from tasks that fit them."""
        used: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for node_id, resources in self._foreign.items():
            for name, amount in resources.items():
                used[node_id][name] += amount
        ahead: dict[str, int] = defaultdict(int)
        for lane in self._lane_list():
            if lane.ahead:
                ahead[lane.node_id] += 1
                continue
            for name, amount in lane.resources.items():
                used[lane.node_id][name] += amount
        return used, ahead

    def _releases(self) -> dict[str, list[Release]]:
        """When lanes with a timeout give their resources back, at the latest."""
        releases: dict[str, list[Release]] = defaultdict(list)
        offset = datetime.now(UTC) - timedelta(seconds=time.monotonic()) + self._clock_offset
        for lane in self._lane_list():
            if lane.timeout_s is None:
                continue
            at = offset + timedelta(seconds=lane.dispatched_at + lane.timeout_s)
            releases[lane.node_id].append(Release(at=at, resources=lane.resources))
        return releases

    def _schedule(self, report: TickReport) -> None:
        used, ahead = self._ledger()
        nodes = cluster.read_nodes(used, self._releases(), self._ray_view_behind())
        self._warm_up(nodes)
        slots = sum(_slots(node) for node in nodes)
        ahead_open = {
            node.node_id: max(
                0,
                self.config.lease_ahead * max(1, int(node.total.get("CPU", 0.0)))
                - ahead.get(node.node_id, 0),
            )
            for node in nodes
        }
        if slots == 0 and not any(ahead_open.values()):
            return
        lanes_wanted = slots + sum(ahead_open.values())
        window = min(self.config.window, max(64, lanes_wanted * self.config.max_lane_tasks))
        ready = self.store.ready(window, queues=self.config.queues)
        if not ready:
            self._next_due = self.store.next_scheduled_at(queues=self.config.queues)
            return
        self._next_due = None
        # Placement looks at the head of the window; the rest only fills lanes.
        head = ready[: 4 * lanes_wanted + 16]
        plan = self.placer(
            PlacementRequest(tasks=[demand_of(t) for t in head], nodes=nodes, now=self.db_now())
        )
        report.infeasible = list(plan.infeasible)
        by_id = {t.id: t for t in ready}
        taken = {p.task_id for p in plan.placements} | set(plan.infeasible)
        spare = [t for t in ready if t.id not in taken]
        lanes: list[tuple[str, list[ReadyTask], bool]] = []
        for placement in plan.placements:
            first = by_id[placement.task_id]
            lanes.append((placement.node_id, self._fill(first, spare), False))
        for node in nodes:
            for _ in range(ahead_open[node.node_id]):
                first_ahead = self._ahead_candidate(node, nodes, spare)
                if first_ahead is None:
                    break
                spare.remove(first_ahead)
                lanes.append((node.node_id, self._fill(first_ahead, spare), True))
        report.waiting = len(spare)
        log.debug(
            "pass: %d ready, %d placed, %d lanes, free %s",
            len(ready),
            len(plan.placements),
            len(lanes),
            {n.node_id[:6]: dict(n.free) for n in nodes},
        )
        if lanes:
            self._lease_and_dispatch(lanes, report)

    def _warm_up(self, nodes: Sequence[NodeView]) -> None:
        """Start worker processes on nodes this scheduler has not warmed yet."""
        if self.config.warm_workers_per_node <= 0:
            return
        for node in nodes:
            if node.node_id in self._warming:
                continue
            cpus = int(node.total.get("CPU", 0.0))
            gpu_workers = min(int(node.total.get("GPU", 0.0)), cpus)
            cpu_workers = min(self.config.warm_workers_per_node, cpus - gpu_workers)
            self._warming[node.node_id] = cluster.warm_node(
                node,
                self.database_url,
                cpu_workers=cpu_workers,
                gpu_workers=gpu_workers,
                timeout_s=self.config.warm_timeout_s,
            )

    def warmed(self, timeout_s: float) -> bool:
        """Waits (up to ``timeout_s``) until the first pass has warmed the nodes; False if
        this scheduler is not the leader or warm-up did not finish in time."""
        deadline = time.monotonic() + timeout_s
        if not self._first_pass.wait(timeout_s) or self.epoch is None:
            return False
        refs = [ref for warming in list(self._warming.values()) for ref in warming.refs]
        return cluster.settled(refs, max(0.0, deadline - time.monotonic()))

    def _fill(self, first: ReadyTask, spare: list[ReadyTask]) -> list[ReadyTask]:
        """``first`` and, after it, spare tasks of its shape expected to end within the
        lane's target time, taken in priority order (they leave ``spare``)."""
        lane = [first]
        if _lane_alone(first):
            return lane
        budget = self.config.lane_target_s - self.durations.get(first.type, float("inf"))
        if budget <= 0:
            return lane
        shape = _shape(first)
        keep: list[ReadyTask] = []
        for index, task in enumerate(spare):
            if len(lane) >= self.config.max_lane_tasks or budget <= 0:
                keep.extend(spare[index:])
                break
            expected = self.durations.get(task.type)
            if expected is None or _lane_alone(task) or _shape(task) != shape:
                keep.append(task)
                continue
            lane.append(task)
            budget -= expected
        spare[:] = keep
        return lane

    def _ahead_candidate(
        self, node: NodeView, nodes: Sequence[NodeView], spare: Iterable[ReadyTask]
    ) -> ReadyTask | None:
        """The first spare task of a type known to be short that the node could hold when
        empty: it waits there for a slot. Only short work is worth leasing ahead (a pass
        costs milliseconds, which matters only beside tasks that take milliseconds), and a
        long task waiting ahead would hold its slot against higher-priority work.
        CPU-only work waits on GPU nodes only if the cluster has no other."""
        cpu_nodes_exist = any(not n.has_gpus for n in nodes)
        for task in spare:
            expected = self.durations.get(task.type)
            if expected is None or expected > self.config.ahead_max_s or _lane_alone(task):
                continue
            demand = demand_of(task)
            if not could_hold(demand, node):
                continue
            if node.has_gpus and not demand.needs_gpu and cpu_nodes_exist:
                continue
            return task
        return None

    def _lease_and_dispatch(
        self, lanes: list[tuple[str, list[ReadyTask], bool]], report: TickReport
    ) -> None:
        requests = [(task.id, node_id) for node_id, tasks, _ in lanes for task in tasks]
        try:
            grants = self.store.lease_many(
                requests, epoch=self.epoch, ttl_s=self.config.lease_ttl_s
            )
        except NotLeaderError:
            log.warning("scheduler %s lost the leader lease; standing by", self.holder)
            self.epoch = None
            return
        lease_of = {g.task_id: g.lease_id for g in grants}
        for node_id, tasks, is_ahead in lanes:
            granted = [t for t in tasks if t.id in lease_of]
            if not granted:
                continue
            lane = cluster.dispatch(
                granted,
                [lease_of[t.id] for t in granted],
                node_id,
                self.database_url,
                heartbeat_interval_s=self.config.heartbeat_interval_s,
                lease_ttl_s=self.config.lease_ttl_s,
                ahead=is_ahead,
            )
            lane.timeout_s = granted[0].timeout_s
            with self._lanes_lock:
                self.lanes[lane.ref] = lane
            report.lanes += 1
            report.dispatched += len(granted)
        self._lanes_changed.set()

    # -- watching ---------------------------------------------------------------------------

    def _collect_finished(self) -> int:
        with self._lanes_lock:
            refs = list(self.lanes)
        ended = cluster.finished(refs, 0.0)
        if not ended and not self._unrecorded:
            return 0
        failures = list(self._unrecorded)
        count = 0
        for ref in ended:
            with self._lanes_lock:
                lane = self.lanes.pop(ref, None)
                self._ended.discard(ref)
            if lane is None:
                continue
            count += len(lane.leases)
            self._released.append((time.monotonic(), lane.node_id, lane.resources))
            self._started_ahead_on(lane.node_id)
            reported, ray_error = cluster.outcome(lane)
            if reported is not None:
                self._learn(lane.task_type, reported)
                continue
            cluster.forget_nodes()
            cluster.forget_agents()
            # The executor could not report (its worker or node died, or the lane was
            # stopped): record the attempts its tasks were in. The fence refuses those that
            # committed before the end, or whose lease was already taken away.
            reason = ray_error or "lane ended without a report"
            if lane.stopped_because is not None:
                reason = f"stopped with its lane ({lane.stopped_because})"
            else:
                log.warning("lane of %d task(s) ended in Ray: %s", len(lane.leases), ray_error)
            failures += [Failure(t, lease, reason) for t, lease in lane.leases.items()]
        if failures:
            # Their lanes have left the ledger: if the store cannot take the failures now,
            # a later pass records them (the fence refuses any that were recorded).
            self._unrecorded = failures
            self.store.fail_many(failures)
            self._unrecorded = []
        self.totals["finished"] += count
        return count

    def _started_ahead_on(self, node_id: str) -> None:
        """A lane on the node ended: the oldest lane waiting ahead there has its slot now."""
        waiting = [lane for lane in self._lane_list() if lane.node_id == node_id and lane.ahead]
        if waiting:
            min(waiting, key=lambda lane: lane.dispatched_at).ahead = False

    def _learn(self, task_type: str, reported: list[tuple[str, str, float]]) -> None:
        for _task_id, _what, seconds in reported:
            mean = self.durations.get(task_type)
            self.durations[task_type] = (
                seconds if mean is None else mean + _DURATION_WEIGHT * (seconds - mean)
            )

    def _ray_view_behind(self) -> dict[str, dict[str, float]]:
        """Per node, what Ray shows in use that is free for taskray's placement: what lanes
        just gave back (Ray's view lags), and the GPUs warm-up tasks hold for the seconds
        it takes to start the node's GPU workers (a GPU task placed there starts as soon
        as they are up, in one of them; counting them taken would send CPU work to the
        GPU node instead)."""
        behind = self._recently_released()
        for warming in self._warming.values():
            warming.gpu_refs = cluster.unfinished(warming.gpu_refs)
            if warming.gpu_refs:
                behind[warming.node_id]["GPU"] += len(warming.gpu_refs)
        return behind

    def _recently_released(self) -> dict[str, dict[str, float]]:
        horizon = time.monotonic() - RAY_VIEW_LAG_S
        while self._released and self._released[0][0] < horizon:
            self._released.popleft()
        released: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for _when, node_id, resources in self._released:
            for name, amount in resources.items():
                released[node_id][name] += amount
        return released

    def _lane_of(self) -> dict[uuid.UUID, cluster.Lane]:
        return {task_id: lane for lane in self._lane_list() for task_id in lane.leases}

    def _enforce_timeouts(self) -> int:
        expired = self.store.timed_out()
        if not expired:
            return 0
        lane_of = self._lane_of()
        failures = []
        for task_id, lease_id, timeout_s in expired:
            lane = lane_of.get(task_id)
            if lane is not None and lane.leases.get(task_id) == lease_id:
                cluster.cancel(lane, "timeout")
            failures.append(
                Failure(task_id, lease_id, f"TimeoutError: timed out after {timeout_s:g}s")
            )
        states = self.store.fail_many(failures)
        return sum(1 for state in states.values() if state is not None)

    def _vouch_for_waiting_lanes(self) -> None:
        """Renew the leases of dispatched tasks that have not started yet.

        Until its executor starts (and keeps its leases), a lane waits in Ray for a slot or
        a worker process, which can take seconds on a busy node; the scheduler vouches for
        its tasks meanwhile, so their leases do not run out and get them reaped and run
        twice. Running tasks are the executor's to keep.
        """
        leases = [pair for lane in self._lane_list() for pair in lane.leases.items()]
        if leases:
            self.store.heartbeat_many(
                leases, ttl_s=self.config.lease_ttl_s, states=(TaskState.LEASED.value,)
            )

    def _stop_orphans(self) -> None:
        """Stop lanes holding a task whose lease is gone (cancelled, or reaped and leased
        again): its executor could not commit anyway."""
        lanes = [lane for lane in self._lane_list() if lane.stopped_because is None]
        if not lanes:
            return
        states = self.store.lease_states([t for lane in lanes for t in lane.leases])
        for lane in lanes:
            for task_id, lease_id in lane.leases.items():
                status, current = states.get(task_id, (None, None))
                if status is TaskState.CANCELLED or (
                    status is not None and status.is_live and current != lease_id
                ):
                    cluster.cancel(lane, f"lease gone ({status.value})")
                    break

    # -- the loop ---------------------------------------------------------------------------

    def wake(self) -> None:
        """New work may be ready: run a pass now (the embedded SDK calls this on SQLite,
        which has no notifications)."""
        self._wake.set()

    def run(self) -> None:
        """Pass after pass until :meth:`stop`; sleeps until woken or a timer is due."""
        threads = [
            threading.Thread(
                target=self._supervised(self._watch_lanes, "lane watch"),
                name="taskray-lane-watch",
                daemon=True,
            )
        ]
        if self.store.is_postgres:
            threads.append(
                threading.Thread(
                    target=self._supervised(self._listen, "listen"),
                    name="taskray-listen",
                    daemon=True,
                )
            )
        for thread in threads:
            thread.start()
        failures = 0
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    self.tick()
                except Exception as exc:  # the loop survives anything; a bug must not stop it
                    failures += 1
                    pause = _backoff_s(failures)
                    if isinstance(exc, StoreUnavailableError):
                        log.warning("store unavailable: %s; retry in %.1f s", exc.message, pause)
                    else:
                        log.exception("scheduler pass failed; retry in %.1f s", pause)
                    self._stop.wait(pause)
                    continue
                failures = 0
                if self.last_report.dispatched:
                    continue  # there may be more to place: no wait before the next pass
                self._wake.wait(self._wait_s())
        finally:
            self._stop.set()
            self._lanes_changed.set()
            for thread in threads:
                thread.join(timeout=5)
            cluster.stop_agents(self.database_url)
        if self._service_died is not None:
            raise RuntimeError(f"the scheduler's {self._service_died} service stopped")

    def _wait_s(self) -> float:
        now = time.monotonic()
        wait = self.config.idle_wait_s
        if self.epoch is None:
            return min(wait, self.config.leader_ttl_s / 3)
        wait = min(wait, self._leader_timer.left(now))
        if not self.store.is_postgres:
            wait = min(wait, self.config.poll_interval_s)
        if self.lanes:
            wait = min(
                wait,
                self._timeout_timer.left(now),
                self._orphan_timer.left(now),
                self._vouch_timer.left(now),
            )
        if self.last_report.waiting:
            # Ready tasks found no room: room held by Ray's lagging view or by others' work
            # frees up without any notification.
            wait = min(wait, self.config.watch_interval_s)
        if self._next_due is not None:
            until_due = (self._next_due - self.db_now()).total_seconds()
            wait = min(wait, max(0.0, until_due))
        return max(wait, 0.0)

    def _supervised(self, service: Callable[[], None], name: str) -> Callable[[], None]:
        """``service`` on its thread; if it ends before the scheduler stops (it raised), the
        loop stops too, so that the process fails loudly (and is restarted) rather than
        run on without it."""

        def run() -> None:
            try:
                service()
            except BaseException:
                log.exception("the scheduler's %s service failed", name)
            finally:
                if not self._stop.is_set():
                    self._service_died = name
                    self.stop()

        return run

    def _listen(self) -> None:
        """Wake the loop on new work (PostgreSQL NOTIFY); reconnect after any failure."""
        failures = 0
        while not self._stop.is_set():
            try:
                listener = self.store.listener(self.config.poll_interval_s)
            except Exception as exc:
                failures += 1
                pause = _backoff_s(failures)
                log.warning("cannot listen for new work (%s); retry in %.1f s", exc, pause)
                self._stop.wait(pause)
                continue
            failures = 0
            self.listener_connected = True
            self.listener_connects += 1
            # A pass now: work may have arrived while nobody was listening.
            self._wake.set()
            try:
                while not self._stop.is_set():
                    if listener.wait(0.5):
                        self._wake.set()
            except Exception as exc:
                log.warning("listening for new work failed (%s); reconnecting", exc)
            finally:
                self.listener_connected = False
                try:
                    listener.close()
                except Exception:
                    log.debug("closing the listener failed", exc_info=True)

    def _watch_lanes(self) -> None:
        """Wake the loop the moment a lane ends in Ray."""
        while not self._stop.is_set():
            with self._lanes_lock:
                refs = [ref for ref in self.lanes if ref not in self._ended]
            if not refs:
                self._lanes_changed.wait(0.5)
                self._lanes_changed.clear()
                continue
            try:
                ended = cluster.finished(refs, 0.01)
            except Exception:
                log.exception("watching lanes failed")
                self._stop.wait(0.5)
                continue
            if ended:
                with self._lanes_lock:
                    self._ended.update(ended)
                self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def resign(self) -> None:
        if self.epoch is not None:
            self.store.release_leadership(self.holder)
            self.epoch = None

    def status(self) -> dict[str, object]:
        lanes = self._lane_list()
        return {
            "holder": self.holder,
            "epoch": self.epoch,
            "lanes": len(lanes),
            "in_flight": sum(len(lane.leases) for lane in lanes),
            "totals": dict(self.totals),
            "listener": {
                "connected": self.listener_connected,
                "connects": self.listener_connects,
            },
            "last": {
                "waiting": self.last_report.waiting,
                "infeasible": [str(t) for t in self.last_report.infeasible],
            },
        }


def _backoff_s(failures: int) -> float:
    """The pause after ``failures`` failures in a row: 0.1 s doubling to at most 1 s, with
    jitter, so that a store that is back is used again within about a second."""
    return min(0.1 * 2.0 ** min(failures - 1, 8), 1.0) * random.uniform(0.75, 1.0)


def _slots(node: NodeView) -> int:
    """About how many lanes could start on the node now: by its scarcest of CPU and GPU
    (at least one when anything is free, for tasks that need neither)."""
    cpus = node.free.get("CPU", 0.0)
    gpus = node.free.get("GPU", 0.0)
    count = int(cpus + EPSILON) + int(gpus + EPSILON)
    if count == 0 and any(amount > EPSILON for amount in node.free.values()):
        return 1
    return count
