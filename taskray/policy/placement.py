"""Placement: which ready task goes on which node now.

``place(request, policy) -> plan`` is pure. A policy is a list of filters (may this
task go on this node?) and weighted scorers (how good is this node for it?); the
loop below is shared, so a new placement idea is a new filter or scorer.

The loop makes two passes over the tasks, in the order given (priority, then age):

1. *Primary*: each task, in turn, takes the best node that passes the filters. A task
   that fits no node at all now may reserve the node it could start on soonest, at
   most ``reservations_per_class`` per class (GPU / CPU-only), so a big task is not
   starved by a stream of small ones and the cluster does not drain for nothing. A
   reserved node is closed to lower-ranked tasks, except those that end before the
   reserving task could start there or use only what it will not need (EASY
   backfill; both need the expected ends that ``NodeView.releases`` and
   ``TaskDemand.expected_duration_s`` carry, else the hold is strict).
2. *Backfill*: the tasks left over get one more turn, in the same order. CPU-only
   tasks may use a GPU node only here, so every GPU task of the request has had its
   claim on the GPU nodes first (GPU nodes are held softly for GPU work).

Three safety filters (the resource exists on the node, the labels match, the task
fits what is free) always run; a policy's filters come on top of them, so no policy
can overcommit a node.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from taskray.policy.types import (
    EPSILON,
    NodeView,
    Placement,
    PlacementPlan,
    PlacementRequest,
    Release,
    TaskDemand,
)

__all__ = [
    "DEFAULT_POLICY",
    "FIRST_FIT",
    "HARD_GPU_RESERVATION",
    "SAFETY_FILTERS",
    "Filter",
    "Phase",
    "PlacementPolicy",
    "PlacementState",
    "Scorer",
    "alignment",
    "could_hold",
    "cpu_tasks_off_gpu_nodes",
    "fits",
    "fits_free",
    "gpu_avoidance",
    "gpu_nodes_soft",
    "keeps_gpu_headroom",
    "matches_selector",
    "most_allocated",
    "place",
    "resources_present",
    "respects_reservations",
    "unmet_demand",
]


class Phase(enum.Enum):
    PRIMARY = "primary"
    BACKFILL = "backfill"


class PlacementState:
    """What filters and scorers may read about one ``place()`` call in progress.

    Only the loop in this module changes it (through the underscored methods).
    """

    __slots__ = (
        "_free",
        "_pending_gpu",
        "_rank",
        "_released",
        "_reserved",
        "nodes",
        "now",
        "phase",
    )

    def __init__(self, request: PlacementRequest) -> None:
        #: Every node, sorted by node_id: the order every tie is broken in.
        self.nodes: tuple[NodeView, ...] = tuple(sorted(request.nodes, key=lambda n: n.node_id))
        self.now: datetime = request.now
        self.phase = Phase.PRIMARY
        self._free: dict[str, dict[str, float]] = {n.node_id: dict(n.free) for n in self.nodes}
        self._rank: dict[uuid.UUID, int] = {t.task_id: i for i, t in enumerate(request.tasks)}
        self._reserved: dict[str, TaskDemand] = {}
        # Expected ends of what this call placed, beside each node's own releases.
        self._released: dict[str, list[Release]] = {n.node_id: [] for n in self.nodes}
        # GPU tasks not yet placed, in rank order: the ones a CPU-only task must not block.
        self._pending_gpu: dict[uuid.UUID, TaskDemand] = {}

    def free(self, node_id: str) -> Mapping[str, float]:
        """What is free on the node now, net of what this call has placed on it."""
        return self._free[node_id]

    def rank(self, task: TaskDemand) -> int:
        """The task's position in the request: lower goes first."""
        return self._rank[task.task_id]

    def reserved_for(self, node_id: str) -> TaskDemand | None:
        return self._reserved.get(node_id)

    def pending_gpu_tasks(self) -> Iterable[TaskDemand]:
        """Feasible GPU tasks of this request not placed (yet), in rank order."""
        return self._pending_gpu.values()

    def start_time(
        self, task: TaskDemand, node: NodeView
    ) -> tuple[datetime | None, dict[str, float]]:
        """When ``task`` could start on ``node`` at the earliest, going by the expected
        releases (None: not by any known one), and what would be left over then."""
        available = dict(self._free[node.node_id])
        if fits(task.demand, available):
            return self.now, _minus(available, task.demand)
        releases = sorted((*node.releases, *self._released[node.node_id]), key=lambda r: r.at)
        for release in releases:
            for name, amount in release.resources.items():
                available[name] = available.get(name, 0.0) + amount
            if fits(task.demand, available):
                return max(release.at, self.now), _minus(available, task.demand)
        return None, {}

    def _add_pending_gpu(self, task: TaskDemand) -> None:
        self._pending_gpu[task.task_id] = task

    def _place(self, task: TaskDemand, node_id: str) -> None:
        free = self._free[node_id]
        for name, amount in task.demand.items():
            free[name] = free.get(name, 0.0) - amount
        if task.expected_duration_s is not None:
            ends = self.now + timedelta(seconds=task.expected_duration_s)
            self._released[node_id].append(Release(ends, dict(task.demand)))
        self._pending_gpu.pop(task.task_id, None)

    def _reserve(self, node_id: str, task: TaskDemand) -> None:
        self._reserved[node_id] = task


#: May this task go on this node, given the state of the call?
Filter = Callable[[TaskDemand, NodeView, PlacementState], bool]
#: How good is this node for this task, in [0, 1]; higher is better.
Scorer = Callable[[TaskDemand, NodeView, PlacementState], float]


# --- resource arithmetic ------------------------------------------------------------------


def _requested(task: TaskDemand) -> Iterable[tuple[str, float]]:
    return ((name, amount) for name, amount in task.demand.items() if amount > EPSILON)


def fits(demand: Mapping[str, float], available: Mapping[str, float]) -> bool:
    """Whether ``demand`` fits in ``available`` in every resource (absent means zero)."""
    return all(
        amount <= EPSILON or amount <= available.get(name, 0.0) + EPSILON
        for name, amount in demand.items()
    )


def _minus(left: Mapping[str, float], demand: Mapping[str, float]) -> dict[str, float]:
    out = dict(left)
    for name, amount in demand.items():
        out[name] = out.get(name, 0.0) - amount
    return out


def could_hold(task: TaskDemand, node: NodeView) -> bool:
    """Whether the node could hold the task if it were empty."""
    return (
        resources_present(task, node, None)
        and matches_selector(task, node, None)
        and fits(task.demand, node.total)
    )


# --- filters ------------------------------------------------------------------------------


def resources_present(task: TaskDemand, node: NodeView, state: PlacementState | None) -> bool:
    """The node declares every resource the task asks for (a custom one included)."""
    return all(node.total.get(name, 0.0) > EPSILON for name, _ in _requested(task))


def matches_selector(task: TaskDemand, node: NodeView, state: PlacementState | None) -> bool:
    return all(node.labels.get(key) == value for key, value in task.node_selector.items())


def fits_free(task: TaskDemand, node: NodeView, state: PlacementState) -> bool:
    return fits(task.demand, state.free(node.node_id))


#: Run before any policy filter, whatever the policy: they are the safety invariant.
SAFETY_FILTERS: tuple[Filter, ...] = (resources_present, matches_selector, fits_free)


def _passes_safety(task: TaskDemand, node: NodeView, state: PlacementState) -> bool:
    return all(check(task, node, state) for check in SAFETY_FILTERS)


def respects_reservations(task: TaskDemand, node: NodeView, state: PlacementState) -> bool:
    """A node held for a task is closed to tasks ranked below it, except (EASY backfill)
    one expected to end before the holder could start there, or one that fits in what
    the holder will leave over then."""
    holder = state.reserved_for(node.node_id)
    if holder is None or state.rank(task) <= state.rank(holder):
        return True
    starts, spare = state.start_time(holder, node)
    if starts is None:
        return False
    if task.expected_duration_s is not None and (
        state.now + timedelta(seconds=task.expected_duration_s) <= starts
    ):
        return True
    return fits(task.demand, spare)


def _cpu_nodes_could_hold(task: TaskDemand, state: PlacementState) -> bool:
    return any(not n.has_gpus and could_hold(task, n) for n in state.nodes)


def gpu_nodes_soft(task: TaskDemand, node: NodeView, state: PlacementState) -> bool:
    """A CPU-only task takes a GPU node's spare CPU and memory only as a last resort.

    Only in the backfill pass (so every GPU task of the request has claimed the GPU
    nodes first), only when no CPU node can take it now, and only if the GPU tasks
    still waiting that fit the node now would still all fit, packed greedily in rank
    order, once it is there. A CPU-only task that no CPU node could ever hold is GPU-node
    work like any other: it competes there in rank order, or it could wait forever.
    """
    if task.needs_gpu or not node.has_gpus or not _cpu_nodes_could_hold(task, state):
        return True
    if state.phase is Phase.PRIMARY:
        return False
    if any(
        not other.has_gpus
        and _passes_safety(task, other, state)
        and respects_reservations(task, other, state)
        for other in state.nodes
    ):
        return False
    protected = [
        gpu_task
        for gpu_task in state.pending_gpu_tasks()
        if _passes_safety(gpu_task, node, state) and respects_reservations(gpu_task, node, state)
    ]
    if not protected:
        return True
    free = state.free(node.node_id)
    packed = _greedy_pack(protected, free)
    return len(_greedy_pack(packed, _minus(free, task.demand))) == len(packed)


def keeps_gpu_headroom(share: float) -> Filter:
    """A CPU-only task on a GPU node leaves, for every idle GPU there, ``share`` of the
    node's CPUs and memory per GPU (and of any other resource it has), so the GPU task
    that comes next finds the CPU and memory to go with the GPU. A busy GPU's task holds
    its own, and gives them back with the GPU."""

    def keeps_gpu_headroom(task: TaskDemand, node: NodeView, state: PlacementState) -> bool:
        if task.needs_gpu or not node.has_gpus or not _cpu_nodes_could_hold(task, state):
            return True
        free = state.free(node.node_id)
        gpus = node.total["GPU"]
        idle = max(free.get("GPU", 0.0), 0.0)
        return all(
            free.get(name, 0.0) - amount
            >= share * idle * node.total.get(name, 0.0) / gpus - EPSILON
            for name, amount in _requested(task)
        )

    return keeps_gpu_headroom


def cpu_tasks_off_gpu_nodes(task: TaskDemand, node: NodeView, state: PlacementState) -> bool:
    """Hard GPU reservation: a CPU-only task never runs on a GPU node, unless no CPU
    node could ever hold it (otherwise it would wait forever)."""
    if task.needs_gpu or not node.has_gpus:
        return True
    return not _cpu_nodes_could_hold(task, state)


def _greedy_pack(tasks: Sequence[TaskDemand], free: Mapping[str, float]) -> list[TaskDemand]:
    left = dict(free)
    packed = []
    for task in tasks:
        if fits(task.demand, left):
            left = _minus(left, task.demand)
            packed.append(task)
    return packed


# --- scorers ------------------------------------------------------------------------------


def alignment(task: TaskDemand, node: NodeView, state: PlacementState) -> float:
    """Tetris: cosine of the task's demand and the node's free vector, both as shares of
    the node's total, so a task goes where the room left has its shape and no single
    resource is stranded."""
    free = state.free(node.node_id)
    dot = demand_sq = free_sq = 0.0
    for name, total in node.total.items():
        if total <= EPSILON:
            continue
        d = task.demand.get(name, 0.0) / total
        f = max(free.get(name, 0.0), 0.0) / total
        dot += d * f
        demand_sq += d * d
        free_sq += f * f
    if demand_sq <= 0.0 or free_sq <= 0.0:
        return 0.0
    return dot / math.sqrt(demand_sq * free_sq)


def most_allocated(task: TaskDemand, node: NodeView, state: PlacementState) -> float:
    """Bin-packing: how full the node is, in the resources the task asks for, once it is
    there. Packing tight keeps whole nodes empty for the big tasks."""
    free = state.free(node.node_id)
    shares = [
        1.0 - (free.get(name, 0.0) - amount) / node.total[name]
        for name, amount in _requested(task)
        if node.total.get(name, 0.0) > EPSILON
    ]
    return sum(shares) / len(shares) if shares else 0.0


def gpu_avoidance(task: TaskDemand, node: NodeView, state: PlacementState) -> float:
    """0 for a CPU-only task on a GPU node, 1 otherwise: GPU nodes are the scarce kind."""
    return 0.0 if node.has_gpus and not task.needs_gpu else 1.0


# --- the policy and the loop --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    name: str
    #: Checked after the safety filters; a node must pass all of them.
    filters: tuple[Filter, ...] = ()
    #: The node with the highest weighted sum wins; ties go to the lowest node_id.
    scorers: tuple[tuple[Scorer, float], ...] = ()
    #: How many nodes may be held back per class (GPU tasks, CPU-only tasks) for the
    #: highest-ranked tasks that fit nowhere now. 0: never hold a node (pure FCFS backfill).
    reservations_per_class: int = 1
    #: A task reserves only once it has been ready this long: most big tasks find room
    #: on their own soon, and each reservation idles a node while it drains.
    reserve_after_s: float = 0.0


#: The recommended policy. Filters: reservations with EASY backfill, GPU nodes held
#: softly for GPU work, and half of a GPU's share of CPU and memory kept beside each idle
#: GPU. Scorers: CPU nodes first for CPU work (the filters already make that so; the
#: scorer keeps it so in policies without them), then Tetris alignment and tight packing.
#: A task reserves once it has been ready 15 minutes (Slurm's ``bf_min_age_reserve``):
#: in bench/placement_sim.py, reserving at once drained the 4-GPU node for big tasks that
#: would soon have fitted anyway, leaving more GPUs idle than first-fit did.
DEFAULT_POLICY = PlacementPolicy(
    name="default",
    filters=(respects_reservations, gpu_nodes_soft, keeps_gpu_headroom(0.5)),
    scorers=((gpu_avoidance, 4.0), (alignment, 1.0), (most_allocated, 1.0)),
    reservations_per_class=1,
    reserve_after_s=900.0,
)

#: The baseline: tasks in the order given, each on the first node (by node_id) with room;
#: no reservations, no preference between node kinds.
FIRST_FIT = PlacementPolicy(name="first-fit", reservations_per_class=0)

#: The default with a hard split: CPU-only tasks never use a GPU node (unless only a GPU
#: node could ever hold them). Simpler, and leaves the GPU nodes' spare CPUs unused.
HARD_GPU_RESERVATION = PlacementPolicy(
    name="hard-gpu",
    filters=(respects_reservations, cpu_tasks_off_gpu_nodes),
    scorers=DEFAULT_POLICY.scorers,
    reservations_per_class=DEFAULT_POLICY.reservations_per_class,
    reserve_after_s=DEFAULT_POLICY.reserve_after_s,
)


def place(request: PlacementRequest, policy: PlacementPolicy | None = None) -> PlacementPlan:
    """Decide where the request's tasks go now. Pure: same request, same plan.

    ``placements`` come in the order they were decided; ``waiting`` and ``infeasible``
    in the request's order.
    """
    policy = policy or DEFAULT_POLICY
    state = PlacementState(request)
    placements: list[Placement] = []
    infeasible: list[uuid.UUID] = []
    candidates: list[TaskDemand] = []
    for task in request.tasks:
        if any(could_hold(task, node) for node in state.nodes):
            candidates.append(task)
            if task.needs_gpu:
                state._add_pending_gpu(task)
        else:
            infeasible.append(task.task_id)

    reservations_left = {True: policy.reservations_per_class, False: policy.reservations_per_class}
    left_over: list[TaskDemand] = []
    for task in candidates:
        node = _best_node(task, state, policy)
        if node is not None:
            state._place(task, node.node_id)
            placements.append(Placement(task.task_id, node.node_id))
            continue
        left_over.append(task)
        # Only a task that fits nowhere now reserves: one that fits but was held back
        # (a CPU task kept off the GPU nodes until the backfill pass) may still start
        # this call. Free room only shrinks, so a holder is never placed later in the
        # call, and its reservation stands in the plan.
        if (
            reservations_left[task.needs_gpu] > 0
            and (request.now - task.ready_since).total_seconds() >= policy.reserve_after_s
            and not any(_passes_safety(task, n, state) for n in state.nodes)
        ):
            held = _reservation_target(task, state)
            if held is not None:
                state._reserve(held.node_id, task)
                reservations_left[task.needs_gpu] -= 1

    state.phase = Phase.BACKFILL
    waiting: list[uuid.UUID] = []
    for task in left_over:
        node = _best_node(task, state, policy)
        if node is None:
            waiting.append(task.task_id)
        else:
            state._place(task, node.node_id)
            placements.append(Placement(task.task_id, node.node_id))

    reservations = {node_id: holder.task_id for node_id, holder in state._reserved.items()}
    return PlacementPlan(placements, waiting, infeasible, reservations)


def _best_node(task: TaskDemand, state: PlacementState, policy: PlacementPolicy) -> NodeView | None:
    best: NodeView | None = None
    best_score = -math.inf
    for node in state.nodes:  # sorted by node_id, and only a higher score displaces
        if not _passes_safety(task, node, state):
            continue
        if not all(check(task, node, state) for check in policy.filters):
            continue
        score = sum(weight * scorer(task, node, state) for scorer, weight in policy.scorers)
        if score > best_score + EPSILON:
            best, best_score = node, score
    return best


def _home_nodes(task: TaskDemand, state: PlacementState) -> list[NodeView]:
    """The nodes a task should wait for: CPU nodes for CPU-only work when one could hold
    it, otherwise any node that could."""
    able = [n for n in state.nodes if could_hold(task, n)]
    if not task.needs_gpu:
        cpu_only = [n for n in able if not n.has_gpus]
        if cpu_only:
            return cpu_only
    return able


def _reservation_target(task: TaskDemand, state: PlacementState) -> NodeView | None:
    """The unreserved home node the task could start on soonest by the known releases;
    failing those, the one it is closest to fitting on now."""
    best: NodeView | None = None
    best_key: tuple[int, datetime, float] | None = None
    for node in _home_nodes(task, state):
        if state.reserved_for(node.node_id) is not None:
            continue
        starts, _ = state.start_time(task, node)
        free = state.free(node.node_id)
        # The largest shortfall, as a share of the node, in any one resource.
        gap = max(
            (
                max(amount - free.get(name, 0.0), 0.0) / node.total[name]
                for name, amount in _requested(task)
            ),
            default=0.0,
        )
        key = (0, starts, gap) if starts is not None else (1, state.now, gap)
        if best_key is None or key < best_key:
            best, best_key = node, key
    return best


def unmet_demand(
    plan: PlacementPlan, request: PlacementRequest, *, include_infeasible: bool = True
) -> list[dict[str, float]]:
    """Resource bundles for the autoscaler: one per task left unplaced, in rank order.

    Infeasible tasks are included by default: no node of the cluster can hold them, but
    a node type the autoscaler can launch may.
    """
    left = set(plan.waiting)
    if include_infeasible:
        left.update(plan.infeasible)
    return [
        {name: amount for name, amount in task.demand.items() if amount > EPSILON}
        for task in request.tasks
        if task.task_id in left
    ]
