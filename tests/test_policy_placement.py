"""Placement policy: unit tests per rule, and properties over generated clusters.

Requests are built with the small helpers below; no Ray, no database.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskray.models import Resources
from taskray.policy.placement import (
    DEFAULT_POLICY,
    FIRST_FIT,
    HARD_GPU_RESERVATION,
    Phase,
    PlacementPolicy,
    place,
    unmet_demand,
)
from taskray.policy.types import (
    EPSILON,
    NodeView,
    PlacementPlan,
    PlacementRequest,
    Release,
    TaskDemand,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
GIB = float(1 << 30)
#: The default, reserving at once: most rule tests are about what a reservation does.
EAGER = dataclasses.replace(DEFAULT_POLICY, name="default-eager", reserve_after_s=0.0)


# --- helpers ------------------------------------------------------------------------------


def tid(name: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_OID, name)


def node(
    node_id: str,
    cpu: float = 8,
    gpu: float = 0,
    mem_gib: float = 32,
    *,
    free: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
    custom: Mapping[str, float] | None = None,
    releases: Sequence[tuple[float, Mapping[str, float]]] = (),
) -> NodeView:
    """A node; ``free`` overrides single resources of an otherwise empty node, memory in
    GiB; ``releases`` are (seconds from NOW, resources)."""
    total = {"CPU": float(cpu), "memory": mem_gib * GIB, **(custom or {})}
    if gpu:
        total["GPU"] = float(gpu)
    now_free = dict(total)
    for name, amount in (free or {}).items():
        now_free[name] = amount * GIB if name == "memory" else float(amount)
    return NodeView(
        node_id,
        total,
        now_free,
        labels=dict(labels or {}),
        releases=[Release(NOW + timedelta(seconds=s), dict(r)) for s, r in releases],
    )


def task(
    name: str,
    cpu: float = 1,
    gpu: float = 0,
    mem_gib: float = 0,
    *,
    priority: int = 0,
    waited_s: float = 3600,
    selector: Mapping[str, str] | None = None,
    custom: Mapping[str, float] | None = None,
    duration_s: float | None = None,
) -> TaskDemand:
    resources = Resources(
        num_cpus=cpu, num_gpus=gpu, memory=int(mem_gib * GIB), custom=dict(custom or {})
    )
    return TaskDemand(
        tid(name),
        priority,
        resources.as_dict(),
        NOW - timedelta(seconds=waited_s),
        node_selector=dict(selector or {}),
        expected_duration_s=duration_s,
    )


def request(tasks: Sequence[TaskDemand], nodes: Sequence[NodeView]) -> PlacementRequest:
    """Tasks are ranked as given (the scheduler sorts them by priority, then age)."""
    return PlacementRequest(tasks=list(tasks), nodes=list(nodes), now=NOW)


def where(plan: PlacementPlan) -> dict[uuid.UUID, str]:
    return {p.task_id: p.node_id for p in plan.placements}


# --- the safety rules ---------------------------------------------------------------------


def test_never_overcommits_a_node_within_one_call() -> None:
    plan = place(request([task("a", cpu=3), task("b", cpu=3)], [node("n", cpu=4)]))
    assert where(plan) == {tid("a"): "n"}
    assert plan.waiting == [tid("b")]


def test_memory_and_custom_resources_are_respected() -> None:
    nodes = [
        node("plain", cpu=8, mem_gib=8),
        node("tpu", cpu=8, mem_gib=64, custom={"tpu": 2}),
    ]
    tasks = [task("needs-tpu", custom={"tpu": 1}), task("needs-mem", mem_gib=16)]
    assert where(place(request(tasks, nodes))) == {tid("needs-tpu"): "tpu", tid("needs-mem"): "tpu"}
    # Three tasks, two TPUs: one waits.
    tasks = [task(f"t{i}", custom={"tpu": 1}) for i in range(3)]
    plan = place(request(tasks, nodes))
    assert len(plan.placements) == 2 and plan.waiting == [tid("t2")]


def test_node_selector_is_respected() -> None:
    nodes = [node("a", labels={"zone": "a"}), node("b", labels={"zone": "b"})]
    plan = place(request([task("t", selector={"zone": "b"})], nodes))
    assert where(plan) == {tid("t"): "b"}


def test_infeasible_versus_waiting() -> None:
    nodes = [node("n", cpu=4, free={"CPU": 1})]
    tasks = [
        task("too-big", cpu=8),  # exceeds every node's total
        task("no-gpu-anywhere", gpu=1),
        task("no-such-label", selector={"zone": "mars"}),
        task("no-such-resource", custom={"tpu": 1}),
        task("later", cpu=4),  # fits the node once it is empty
    ]
    plan = place(request(tasks, nodes))
    never = ("too-big", "no-gpu-anywhere", "no-such-label", "no-such-resource")
    assert plan.infeasible == [tid(name) for name in never]
    assert plan.waiting == [tid("later")] and plan.placements == []


# --- priority and reservations ------------------------------------------------------------


def test_higher_priority_goes_first() -> None:
    tasks = [task("high", cpu=4, priority=10), task("low", cpu=4)]
    plan = place(request(tasks, [node("n", cpu=4)]))
    assert where(plan) == {tid("high"): "n"} and plan.waiting == [tid("low")]


def test_lower_priority_backfills_where_the_higher_does_not_fit() -> None:
    nodes = [node("n", cpu=8, free={"CPU": 2})]
    tasks = [task("big", cpu=4, priority=10, waited_s=0), task("small", cpu=2)]
    plan = place(request(tasks, nodes))  # the big task is too young to reserve
    assert where(plan) == {tid("small"): "n"} and plan.waiting == [tid("big")]
    assert plan.reservations == {}


def test_a_big_task_reserves_a_node_and_smaller_ones_keep_off_it() -> None:
    nodes = [node("a", cpu=8, free={"CPU": 4}), node("b", cpu=8, free={"CPU": 2})]
    tasks = [task("big", cpu=8, priority=10), task("s1", cpu=1), task("s2", cpu=1)]
    plan = place(request(tasks, nodes))
    # "a" lacks 4 of the 8 CPUs, "b" 6: the reservation goes where the shortfall is least.
    assert plan.reservations == {"a": tid("big")}
    assert where(plan) == {tid("s1"): "b", tid("s2"): "b"}
    assert plan.waiting == [tid("big")]


def test_a_reservation_waits_until_the_task_has_waited_reserve_after_s() -> None:
    nodes = [node("a", cpu=8, free={"CPU": 4})]
    young = [task("big", cpu=8, waited_s=DEFAULT_POLICY.reserve_after_s - 1), task("s", cpu=1)]
    assert place(request(young, nodes)).reservations == {}
    old = [task("big", cpu=8, waited_s=DEFAULT_POLICY.reserve_after_s), task("s", cpu=1)]
    plan = place(request(old, nodes))
    assert plan.reservations == {"a": tid("big")} and plan.waiting == [tid("big"), tid("s")]


def test_a_higher_ranked_task_may_use_a_reserved_node() -> None:
    # The reservation is made at the holder's turn; tasks ranked above it went first.
    nodes = [node("a", cpu=8, free={"CPU": 4})]
    tasks = [task("first", cpu=2, priority=10), task("big", cpu=8, priority=5)]
    plan = place(request(tasks, nodes), EAGER)
    assert where(plan) == {tid("first"): "a"} and plan.reservations == {"a": tid("big")}


def test_reservations_are_bounded_per_class() -> None:
    nodes = [
        node("c1", cpu=8, free={"CPU": 1}),
        node("c2", cpu=8, free={"CPU": 1}),
        node("g1", cpu=8, gpu=2, free={"GPU": 0, "CPU": 1}),
        node("g2", cpu=8, gpu=2, free={"GPU": 0, "CPU": 1}),
    ]
    tasks = [
        task("cpu-big-1", cpu=8),
        task("cpu-big-2", cpu=8),
        task("gpu-big-1", cpu=1, gpu=2),
        task("gpu-big-2", cpu=1, gpu=2),
    ]
    plan = place(request(tasks, nodes), EAGER)
    # One per class: the first of each; CPU work waits for a CPU node.
    assert plan.reservations == {"c1": tid("cpu-big-1"), "g1": tid("gpu-big-1")}
    assert place(request(tasks, nodes), FIRST_FIT).reservations == {}
    two = dataclasses.replace(EAGER, reservations_per_class=2)
    assert len(place(request(tasks, nodes), two).reservations) == 4


def test_reservation_goes_to_the_node_that_frees_up_first() -> None:
    nodes = [
        node("a", cpu=8, free={"CPU": 6}, releases=[(600, {"CPU": 2})]),
        node("b", cpu=8, free={"CPU": 0}, releases=[(60, {"CPU": 8})]),
    ]
    plan = place(request([task("big", cpu=8)], nodes), EAGER)
    assert plan.reservations == {"b": tid("big")}


def test_easy_backfill_on_a_reserved_node() -> None:
    # "big" can start on "a" in 300 s, when the running task gives back its 6 CPUs.
    a = node("a", cpu=8, free={"CPU": 2}, releases=[(300, {"CPU": 6})])
    tasks = [
        task("big", cpu=8),
        task("short", cpu=2, duration_s=200),  # ends before "big" can start: backfills
        task("long", cpu=2, duration_s=400),  # would delay "big": waits
        task("unknown", cpu=2),  # no expected end: waits
    ]
    plan = place(request(tasks, [a]), EAGER)
    assert plan.reservations == {"a": tid("big")}
    assert where(plan) == {tid("short"): "a"}
    assert plan.waiting == [tid("big"), tid("long"), tid("unknown")]


def test_easy_backfill_may_use_what_the_holder_will_not_need() -> None:
    a = node("a", cpu=16, free={"CPU": 4}, releases=[(300, {"CPU": 12})])
    tasks = [task("big", cpu=12), task("spare", cpu=4), task("more", cpu=1)]
    plan = place(request(tasks, [a]), EAGER)
    # At 300 s there will be 16 CPUs; "big" needs 12, so 4 may go now, for any length.
    assert where(plan) == {tid("spare"): "a"}
    assert plan.waiting == [tid("big"), tid("more")]


def test_without_known_ends_a_reservation_is_strict() -> None:
    a = node("a", cpu=16, free={"CPU": 4})
    plan = place(request([task("big", cpu=12), task("small", cpu=1, duration_s=1)], [a]), EAGER)
    assert plan.placements == [] and plan.reservations == {"a": tid("big")}


# --- GPU nodes held softly for GPU work ---------------------------------------------------


CPU_NODE = node("cpu", cpu=8, mem_gib=32)
GPU_NODE = node("gpu", cpu=16, gpu=2, mem_gib=64)


def test_cpu_tasks_go_to_cpu_nodes_first() -> None:
    # The GPU node is emptier and better aligned, but CPU work belongs on the CPU node.
    plan = place(request([task("c", cpu=2)], [CPU_NODE, GPU_NODE]))
    assert where(plan) == {tid("c"): "cpu"}


def test_cpu_task_uses_a_gpu_node_when_no_cpu_node_can_take_it() -> None:
    full = dataclasses.replace(CPU_NODE, free={"CPU": 0.0, "memory": 32 * GIB})
    plan = place(request([task("c", cpu=2)], [full, GPU_NODE]))
    assert where(plan) == {tid("c"): "gpu"}


def test_cpu_task_does_not_block_a_waiting_gpu_task_even_a_lower_priority_one() -> None:
    full = dataclasses.replace(CPU_NODE, free={"CPU": 0.0, "memory": 32 * GIB})
    gpu_node = node("gpu", cpu=16, gpu=2, mem_gib=64, free={"CPU": 8})
    tasks = [task("cpu-high", cpu=4, priority=10), task("gpu-low", cpu=6, gpu=1)]
    plan = place(request(tasks, [full, gpu_node]))
    # 8 CPUs free: the CPU task would leave 4, too few for the GPU task's 6.
    assert where(plan) == {tid("gpu-low"): "gpu"}
    assert plan.waiting == [tid("cpu-high")]


def test_cpu_task_takes_what_gpu_tasks_leave_over() -> None:
    full = dataclasses.replace(CPU_NODE, free={"CPU": 0.0, "memory": 32 * GIB})
    tasks = [task("cpu", cpu=4, mem_gib=8), task("g1", cpu=4, gpu=1), task("g2", cpu=4, gpu=1)]
    plan = place(request(tasks, [full, GPU_NODE]))
    assert where(plan) == {tid("g1"): "gpu", tid("g2"): "gpu", tid("cpu"): "gpu"}
    # GPU tasks claim the GPU node first: the CPU task is decided after them.
    assert [p.task_id for p in plan.placements][-1] == tid("cpu")


def test_cpu_task_must_leave_room_for_the_gpu_tasks_that_fit_now_packed_greedily() -> None:
    # The guard inside gpu_nodes_soft, seen on its own: a filter holds GPU work back to
    # the backfill pass, so there the CPU task (ranked first) meets GPU tasks still waiting.
    gpu_last = dataclasses.replace(
        DEFAULT_POLICY,
        filters=(
            *DEFAULT_POLICY.filters,
            lambda t, n, state: not t.needs_gpu or state.phase is Phase.BACKFILL,
        ),
    )
    full = node("cpu", cpu=16, free={"CPU": 0})
    busy = node("gpu", cpu=16, gpu=2, mem_gib=64, free={"CPU": 10, "GPU": 0.0})
    gpu_free = node("gpu", cpu=16, gpu=2, mem_gib=64, free={"CPU": 10, "GPU": 1.0})
    cpu_task, gpu_task = task("cpu", cpu=4), task("g", cpu=8, gpu=1)
    # With no GPU free, the GPU task does not fit now: the CPU task may go.
    plan = place(request([cpu_task, gpu_task], [full, busy]), gpu_last)
    assert where(plan) == {tid("cpu"): "gpu"}
    # With one free, 10 CPUs less 4 would leave too few for its 8: the CPU task waits.
    plan = place(request([cpu_task, gpu_task], [full, gpu_free]), gpu_last)
    assert where(plan) == {tid("g"): "gpu"} and plan.waiting == [tid("cpu")]


def test_cpu_task_leaves_headroom_beside_idle_gpus() -> None:
    full = node("cpu", cpu=16, free={"CPU": 0})
    # Two idle GPUs keep half their share each: 2 x 0.5 x 8 CPUs = 8 of the 16.
    fits = place(request([task("c", cpu=8)], [full, GPU_NODE]))
    assert where(fits) == {tid("c"): "gpu"}
    too_big = place(request([task("c", cpu=9)], [full, GPU_NODE]))
    assert too_big.waiting == [tid("c")]
    # Busy GPUs hold their own CPUs: nothing needs keeping for them.
    busy = dataclasses.replace(GPU_NODE, free={"CPU": 12.0, "GPU": 0.0, "memory": 64 * GIB})
    assert where(place(request([task("c", cpu=12)], [full, busy]))) == {tid("c"): "gpu"}


def test_a_cpu_task_only_a_gpu_node_can_hold_is_not_starved() -> None:
    # 32 CPUs: no CPU node can ever hold it, so it competes for the GPU node in rank order.
    big_gpu_node = node("gpu", cpu=32, gpu=2, mem_gib=64)
    tasks = [task("giant", cpu=32), task("g", cpu=1, gpu=1)]
    plan = place(request(tasks, [CPU_NODE, big_gpu_node]))
    assert where(plan) == {tid("giant"): "gpu"} and plan.waiting == [tid("g")]
    # And when it does not fit, it reserves the GPU node against lower-ranked GPU work.
    busy = dataclasses.replace(big_gpu_node, free={"CPU": 16.0, "GPU": 2.0, "memory": 64 * GIB})
    plan = place(request(tasks, [CPU_NODE, busy]), EAGER)
    assert plan.reservations == {"gpu": tid("giant")} and plan.placements == []


def test_hard_gpu_reservation_keeps_cpu_tasks_off_gpu_nodes() -> None:
    full = dataclasses.replace(CPU_NODE, free={"CPU": 0.0, "memory": 32 * GIB})
    plan = place(request([task("c", cpu=2)], [full, GPU_NODE]), HARD_GPU_RESERVATION)
    assert plan.waiting == [tid("c")]


# --- the baseline, ties, autoscaler demand ------------------------------------------------


def test_first_fit_takes_the_first_node_with_room_and_reserves_nothing() -> None:
    nodes = [node("b-gpu", cpu=16, gpu=2), node("a-small", cpu=2, free={"CPU": 1})]
    tasks = [task("big", cpu=2), task("c", cpu=1), task("d", cpu=1)]
    plan = place(request(tasks, nodes), FIRST_FIT)
    assert where(plan) == {tid("big"): "b-gpu", tid("c"): "a-small", tid("d"): "b-gpu"}
    assert plan.reservations == {}


def test_ties_are_broken_by_node_id_whatever_the_order_given() -> None:
    nodes = [node(name) for name in ("n3", "n1", "n2")]
    for ordering in (nodes, nodes[::-1]):
        assert where(place(request([task("t")], ordering))) == {tid("t"): "n1"}


def test_unmet_demand_lists_the_unplaced_in_rank_order() -> None:
    tasks = [
        task("placed", cpu=1),
        task("waits", cpu=4, mem_gib=1),
        task("never", cpu=64),
    ]
    req = request(tasks, [node("n", cpu=4, free={"CPU": 2})])
    plan = place(req)
    assert unmet_demand(plan, req) == [{"CPU": 4.0, "memory": GIB}, {"CPU": 64.0}]
    assert unmet_demand(plan, req, include_infeasible=False) == [{"CPU": 4.0, "memory": GIB}]


# --- properties ---------------------------------------------------------------------------


@st.composite
def clusters(draw: st.DrawFn) -> PlacementRequest:
    nodes = []
    for i in range(draw(st.integers(1, 4))):
        total = {
            "CPU": float(draw(st.sampled_from([2, 4, 8]))),
            "memory": float(draw(st.sampled_from([0, 8, 16]))),
        }
        gpus = draw(st.sampled_from([0, 0, 1, 2, 4]))
        if gpus:
            total["GPU"] = float(gpus)
        if draw(st.booleans()):
            total["tpu"] = 1.0
        total = {k: v for k, v in total.items() if v}
        share = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
        free = {k: draw(st.sampled_from([v, v * share])) for k, v in total.items()}
        releases = []
        if draw(st.booleans()):
            used = {k: total[k] - free[k] for k in total if total[k] > free[k]}
            releases.append(Release(NOW + timedelta(seconds=draw(st.integers(1, 900))), used))
        labels = {"zone": draw(st.sampled_from("ab"))} if draw(st.booleans()) else {}
        nodes.append(NodeView(f"n{i}", total, free, labels=labels, releases=releases))
    tasks = []
    for i in range(draw(st.integers(0, 10))):
        demand = {
            "CPU": float(draw(st.sampled_from([0, 0.5, 1, 2, 4, 8]))),
            "GPU": float(draw(st.sampled_from([0, 0, 0, 1, 2]))),
            "memory": float(draw(st.sampled_from([0, 0, 4, 8, 16]))),
            "tpu": float(draw(st.sampled_from([0, 0, 0, 1]))),
        }
        tasks.append(
            TaskDemand(
                uuid.UUID(int=i),
                draw(st.sampled_from([0, 5, 10])),
                {k: v for k, v in demand.items() if v},
                NOW - timedelta(seconds=draw(st.sampled_from([0, 1000, 3600]))),
                node_selector={"zone": draw(st.sampled_from("ab"))} if draw(st.booleans()) else {},
                expected_duration_s=draw(st.sampled_from([None, 60.0, 600.0])),
            )
        )
    tasks.sort(key=lambda t: (-t.priority, t.ready_since))
    return PlacementRequest(tasks=tasks, nodes=nodes, now=NOW)


POLICIES = [DEFAULT_POLICY, EAGER, FIRST_FIT, HARD_GPU_RESERVATION]


def _fits(demand: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(a <= EPSILON or a <= free.get(k, 0.0) + EPSILON for k, a in demand.items())


def _selectable(t: TaskDemand, n: NodeView) -> bool:
    return all(n.labels.get(k) == v for k, v in t.node_selector.items()) and all(
        n.total.get(k, 0.0) > EPSILON for k, a in t.demand.items() if a > EPSILON
    )


def _cpu_home(t: TaskDemand, nodes: Sequence[NodeView]) -> bool:
    """Some CPU node could hold this CPU-only task when empty."""
    return any(not n.has_gpus and _selectable(t, n) and _fits(t.demand, n.total) for n in nodes)


def _replay(
    req: PlacementRequest, plan: PlacementPlan
) -> Iterator[tuple[TaskDemand, NodeView, dict[str, float]]]:
    """Each placement in the order decided, with its node's free resources just before."""
    tasks = {t.task_id: t for t in req.tasks}
    nodes = {n.node_id: n for n in req.nodes}
    free = {n.node_id: dict(n.free) for n in req.nodes}
    for p in plan.placements:
        t = tasks[p.task_id]
        yield t, nodes[p.node_id], dict(free[p.node_id])
        for k, a in t.demand.items():
            free[p.node_id][k] = free[p.node_id].get(k, 0.0) - a


def _final_free(req: PlacementRequest, plan: PlacementPlan) -> dict[str, dict[str, float]]:
    free = {n.node_id: dict(n.free) for n in req.nodes}
    for t, n, _ in _replay(req, plan):
        for k, a in t.demand.items():
            free[n.node_id][k] = free[n.node_id].get(k, 0.0) - a
    return free


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@settings(max_examples=200, deadline=None)
@given(req=clusters())
def test_plan_is_safe_and_complete(policy: PlacementPolicy, req: PlacementRequest) -> None:
    plan = place(req, policy)
    # Every task exactly once across placements, waiting and infeasible.
    seen = [p.task_id for p in plan.placements] + plan.waiting + plan.infeasible
    assert sorted(seen) == sorted(t.task_id for t in req.tasks)
    # No node overcommitted in any resource; no task where a resource or label is missing.
    for t, n, free in _replay(req, plan):
        assert _selectable(t, n)
        assert _fits(t.demand, free)
    # Infeasible means no node could hold it even empty; waiting means one could.
    nodes = list(req.nodes)
    by_id = {t.task_id: t for t in req.tasks}
    for task_id in plan.infeasible:
        assert not any(
            _selectable(by_id[task_id], n) and _fits(by_id[task_id].demand, n.total) for n in nodes
        )
    for task_id in plan.waiting:
        assert any(
            _selectable(by_id[task_id], n) and _fits(by_id[task_id].demand, n.total) for n in nodes
        )
    # Reservations: held for waiting tasks, bounded per class.
    assert set(plan.reservations.values()) <= set(plan.waiting)
    for needs_gpu in (True, False):
        holders = [h for h in plan.reservations.values() if by_id[h].needs_gpu == needs_gpu]
        assert len(holders) <= policy.reservations_per_class
    # Deterministic, whatever order the nodes come in.
    assert place(dataclasses.replace(req, nodes=nodes[::-1]), policy) == plan


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@settings(max_examples=200, deadline=None)
@given(req=clusters())
def test_a_task_is_passed_over_only_where_it_did_not_fit(
    policy: PlacementPolicy, req: PlacementRequest
) -> None:
    """If a higher-ranked task waits while a lower-ranked one was placed on a node, the
    higher one did not fit there just before, except where a documented rule kept it
    out: a reservation for a task ranked above it (EASY backfill let the lower one in),
    or GPU-node rules (GPU work, and CPU work no CPU node could hold, claims GPU nodes
    before other CPU work does; CPU work leaves headroom beside idle GPUs)."""
    plan = place(req, policy)
    rank = {t.task_id: i for i, t in enumerate(req.tasks)}
    waiting = [t for t in req.tasks if t.task_id in set(plan.waiting)]
    for low, n, free in _replay(req, plan):
        for high in waiting:
            if rank[high.task_id] > rank[low.task_id]:
                continue
            if not (_selectable(high, n) and _fits(high.demand, free)):
                continue
            holder = plan.reservations.get(n.node_id)
            if holder is not None and rank[holder] < rank[high.task_id]:
                continue
            assert policy is not FIRST_FIT, "first-fit never passes over a task that fits"
            assert not high.needs_gpu, "a GPU task that fits is placed in its turn"
            assert n.has_gpus and _cpu_home(high, req.nodes)
            low_is_gpu_node_work = low.needs_gpu or not _cpu_home(low, req.nodes)
            if not low_is_gpu_node_work and policy in (DEFAULT_POLICY, EAGER):
                # Both CPU work, decided in rank order: the higher was kept out by headroom.
                idle = max(free.get("GPU", 0.0), 0.0)
                assert any(
                    free.get(k, 0.0) - a < 0.5 * idle * n.total.get(k, 0.0) / n.total["GPU"]
                    for k, a in high.demand.items()
                    if a > EPSILON
                )


@pytest.mark.parametrize("policy", [DEFAULT_POLICY, EAGER], ids=lambda p: p.name)
@settings(max_examples=200, deadline=None)
@given(req=clusters())
def test_cpu_work_on_a_gpu_node_is_a_last_resort(
    policy: PlacementPolicy, req: PlacementRequest
) -> None:
    """A CPU-only task (one some CPU node could hold) on a GPU node implies that no CPU
    node had room for it, and that no GPU task that would have fit there is left waiting
    because of it."""
    plan = place(req, policy)
    rank = {t.task_id: i for i, t in enumerate(req.tasks)}
    on_gpu_nodes: dict[str, list[TaskDemand]] = {}
    for t, n, _ in _replay(req, plan):
        if t.needs_gpu or not n.has_gpus or not _cpu_home(t, req.nodes):
            continue
        on_gpu_nodes.setdefault(n.node_id, []).append(t)
    if not on_gpu_nodes:
        return
    # No CPU node had room for it just before (unless held for a task ranked above it).
    replay_free = {n.node_id: dict(n.free) for n in req.nodes}
    for t, n, _ in _replay(req, plan):
        if any(c.task_id == t.task_id for c in on_gpu_nodes.get(n.node_id, [])):
            for other in req.nodes:
                if other.has_gpus or not _selectable(t, other):
                    continue
                holder = plan.reservations.get(other.node_id)
                if holder is not None and rank[holder] < rank[t.task_id]:
                    continue
                assert not _fits(t.demand, replay_free[other.node_id])
        for k, a in t.demand.items():
            replay_free[n.node_id][k] = replay_free[n.node_id].get(k, 0.0) - a
    # No waiting GPU task would fit had these CPU tasks not been there.
    final = _final_free(req, plan)
    for node_id, cpu_tasks in on_gpu_nodes.items():
        n = next(x for x in req.nodes if x.node_id == node_id)
        without = dict(final[node_id])
        for c in cpu_tasks:
            for k, a in c.demand.items():
                without[k] = without.get(k, 0.0) + a
        holder = plan.reservations.get(node_id)
        for g in req.tasks:
            if not g.needs_gpu or g.task_id not in set(plan.waiting) or not _selectable(g, n):
                continue
            if holder is not None and rank[holder] < rank[g.task_id]:
                continue
            assert not _fits(g.demand, without)
