"""Discrete-event simulation of placement policies on a small heterogeneous cluster.

Replays seeded mixed workloads (small and large CPU-only tasks, large-memory tasks,
1-4 GPU tasks, a share of high priority, arrivals over time) and calls
``taskray.policy.placement.place()`` at every arrival and completion, as the scheduler
would. Prints, per policy and seed: makespan, wait per priority class (mean and p95),
GPU utilisation, and GPU-seconds left idle while a GPU task that would have fit on those
idle GPUs was waiting.

Variants: ``first-fit`` (the baseline), ``default`` (DEFAULT_POLICY, told each task's
expected duration, an upper bound 1-2x the real one, as a timeout would be),
``default/no-est`` (the same without durations: reservations hold strictly),
``default/eager`` (reserving as soon as a task fits nowhere, not after 15 minutes) and
``hard-gpu`` (CPU-only tasks never on GPU nodes).

    .venv/bin/python bench/placement_sim.py [--seeds 5] [--tasks 300]

Pure Python, no Ray, no clock reads: durations are declared, not measured.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from taskray.policy.placement import (
    DEFAULT_POLICY,
    FIRST_FIT,
    HARD_GPU_RESERVATION,
    PlacementPolicy,
    place,
)
from taskray.policy.types import (
    EPSILON,
    NodeView,
    PlacementRequest,
    Release,
    TaskDemand,
)

GIB = float(1 << 30)
HIGH = 10
EPOCH = datetime(2030, 1, 1, tzinfo=UTC)

#: (name, CPUs, GPUs, memory in GiB): two CPU nodes, a 4-GPU node and a 2-GPU node.
CLUSTER = (
    ("cpu-a", 16, 0, 64),
    ("cpu-b", 16, 0, 64),
    ("gpu-4", 32, 4, 192),
    ("gpu-2", 16, 2, 96),
)


@dataclass
class SimTask:
    id: uuid.UUID
    kind: str
    priority: int
    demand: dict[str, float]
    duration: float
    arrival: float
    #: What the scheduler is told (a timeout, say): an upper bound on the duration.
    estimate: float
    start: float | None = None
    node: str | None = None


@dataclass
class SimNode:
    id: str
    total: dict[str, float]
    free: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free = dict(self.total)


def workload(seed: int, n_tasks: int, horizon_s: float) -> list[SimTask]:
    rng = random.Random(seed)
    tasks = []
    t = 0.0
    mean_gap = horizon_s / n_tasks
    for _ in range(n_tasks):
        # Bursty arrivals: mostly a Poisson stream, sometimes a batch at once.
        t += 0.0 if rng.random() < 0.25 else rng.expovariate(1.0 / mean_gap)
        r = rng.random()
        if r < 0.35:
            kind, cpu, gpu, mem = "small", rng.choice((1, 1, 2)), 0, rng.uniform(1, 4)
            dur = rng.uniform(10, 60)
        elif r < 0.55:
            kind, cpu, gpu, mem = "large-cpu", rng.choice((6, 8, 12, 16)), 0, rng.uniform(8, 32)
            dur = rng.uniform(60, 300)
        elif r < 0.65:
            kind, cpu, gpu, mem = "large-mem", rng.choice((2, 4)), 0, rng.uniform(32, 60)
            dur = rng.uniform(60, 240)
        else:
            gpu = rng.choice((1, 1, 1, 2, 2, 4))
            kind, cpu, mem = f"gpu{gpu}", 4 * gpu, 16.0 * gpu
            dur = rng.uniform(60, 300)
        demand = {"CPU": float(cpu), "memory": round(mem * GIB)}
        if gpu:
            demand["GPU"] = float(gpu)
        priority = HIGH if rng.random() < 0.2 else 0
        estimate = dur * rng.uniform(1.0, 2.0)
        task_id = uuid.UUID(int=rng.getrandbits(128))
        tasks.append(SimTask(task_id, kind, priority, demand, dur, t, estimate))
    return tasks


def cluster(seed: int) -> list[SimNode]:
    # Ray node ids are random hex, so the order first-fit sees differs from seed to seed.
    rng = random.Random(seed + 10_000)
    nodes = []
    for name, cpu, gpu, mem in CLUSTER:
        total = {"CPU": float(cpu), "memory": mem * GIB}
        if gpu:
            total["GPU"] = float(gpu)
        nodes.append(SimNode(f"{rng.getrandbits(32):08x}-{name}", total))
    return nodes


@dataclass
class Result:
    makespan: float
    wait: dict[str, list[float]]
    gpu_util: float
    idle_gpu_s: float
    cpu_on_gpu: int
    calls: int


def simulate(
    policy: PlacementPolicy, tasks: Sequence[SimTask], nodes: list[SimNode], estimates: bool
) -> Result:
    by_id = {t.id: t for t in tasks}
    nodes_by_id = {n.id: n for n in nodes}
    events: list[tuple[float, int, str, uuid.UUID]] = []
    seq = 0
    for task in tasks:
        heapq.heappush(events, (task.arrival, seq, "arrive", task.id))
        seq += 1
    queue: list[SimTask] = []
    running: dict[str, list[SimTask]] = {n.id: [] for n in nodes}
    now = 0.0
    idle_gpu_s = 0.0
    calls = 0
    cpu_on_gpu = 0
    while events:
        t_next = events[0][0]
        idle_gpu_s += _idle_gpus(nodes, queue) * (t_next - now)
        now = t_next
        while events and events[0][0] <= now + 1e-9:
            _, _, kind, task_id = heapq.heappop(events)
            task = by_id[task_id]
            if kind == "arrive":
                queue.append(task)
            else:
                assert task.node is not None
                running[task.node].remove(task)
                free = nodes_by_id[task.node].free
                for name, amount in task.demand.items():
                    free[name] += amount
        if not queue:
            continue
        queue.sort(key=lambda t: (-t.priority, t.arrival, t.id))
        request = PlacementRequest(
            tasks=[
                TaskDemand(
                    t.id,
                    t.priority,
                    t.demand,
                    EPOCH + timedelta(seconds=t.arrival),
                    expected_duration_s=t.estimate if estimates else None,
                )
                for t in queue
            ],
            nodes=[
                NodeView(
                    n.id,
                    n.total,
                    dict(n.free),
                    releases=[
                        Release(EPOCH + timedelta(seconds=r.start + r.estimate), r.demand)
                        for r in running[n.id]
                        if r.start is not None
                    ]
                    if estimates
                    else (),
                )
                for n in nodes
            ],
            now=EPOCH + timedelta(seconds=now),
        )
        plan = place(request, policy)
        calls += 1
        assert not plan.infeasible, "the workload only has tasks some node can hold"
        started = set()
        for p in plan.placements:
            task = by_id[p.task_id]
            node = nodes_by_id[p.node_id]
            for name, amount in task.demand.items():
                node.free[name] -= amount
                assert node.free[name] >= -EPSILON * max(1.0, node.total[name]), "overcommit"
            task.start, task.node = now, node.id
            running[node.id].append(task)
            if "GPU" not in task.demand and node.total.get("GPU", 0.0) > 0:
                cpu_on_gpu += 1
            started.add(task.id)
            heapq.heappush(events, (now + task.duration, seq, "finish", task.id))
            seq += 1
        queue = [t for t in queue if t.id not in started]
    assert not queue, "every task ran"

    makespan = max(t.start + t.duration for t in tasks if t.start is not None)
    wait: dict[str, list[float]] = {"high": [], "low": [], "gpu": [], "gpu4": [], "big-cpu": []}
    for t in tasks:
        assert t.start is not None
        w = t.start - t.arrival
        wait["high" if t.priority >= HIGH else "low"].append(w)
        if "GPU" in t.demand:
            wait["gpu"].append(w)
            if t.demand["GPU"] >= 4:
                wait["gpu4"].append(w)
        elif t.kind != "small":
            wait["big-cpu"].append(w)
    gpu_total = sum(n.total.get("GPU", 0.0) for n in nodes)
    gpu_busy = sum(t.demand.get("GPU", 0.0) * t.duration for t in tasks)
    return Result(makespan, wait, gpu_busy / (gpu_total * makespan), idle_gpu_s, cpu_on_gpu, calls)


def _idle_gpus(nodes: Sequence[SimNode], queue: Sequence[SimTask]) -> float:
    """GPUs free on nodes where a waiting GPU task would have fit on the GPUs alone (so
    CPU, memory or the policy kept it out)."""
    idle = 0.0
    for node in nodes:
        free_gpus = node.free.get("GPU", 0.0)
        if free_gpus < 1.0 - EPSILON:
            continue
        if any(
            EPSILON < t.demand.get("GPU", 0.0) <= free_gpus + EPSILON
            and all(a <= node.total.get(k, 0.0) for k, a in t.demand.items())
            for t in queue
        ):
            idle += free_gpus
    return idle


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else 0.0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--horizon", type=float, default=7000.0, help="arrival window, s")
    args = parser.parse_args(argv)

    # (label, policy, whether the scheduler knows expected ends)
    variants = (
        ("first-fit", FIRST_FIT, False),
        ("default", DEFAULT_POLICY, True),
        ("default/no-est", DEFAULT_POLICY, False),
        ("default/eager", replace(DEFAULT_POLICY, reserve_after_s=0.0), True),
        ("hard-gpu", HARD_GPU_RESERVATION, True),
    )
    seeds = list(range(args.seeds))
    results: dict[str, list[Result]] = {label: [] for label, _, _ in variants}
    started = time.perf_counter()
    for seed in seeds:
        tasks = workload(seed, args.tasks, args.horizon)
        for label, policy, estimates in variants:
            fresh = [
                SimTask(t.id, t.kind, t.priority, dict(t.demand), t.duration, t.arrival, t.estimate)
                for t in tasks
            ]
            results[label].append(simulate(policy, fresh, cluster(seed), estimates))
    elapsed = time.perf_counter() - started

    print(
        f"cluster: {', '.join(f'{n} {c}CPU/{g}GPU/{m}GiB' for n, c, g, m in CLUSTER)}; "
        f"{args.tasks} tasks per seed arriving over {args.horizon:.0f}s, 20% high priority"
    )
    metrics: list[tuple[str, Callable[[Result], float], str]] = [
        ("makespan s", lambda r: r.makespan, "{:.0f}"),
        ("wait high mean s", lambda r: mean(r.wait["high"]), "{:.1f}"),
        ("wait high p95 s", lambda r: p95(r.wait["high"]), "{:.1f}"),
        ("wait low mean s", lambda r: mean(r.wait["low"]), "{:.1f}"),
        ("wait low p95 s", lambda r: p95(r.wait["low"]), "{:.1f}"),
        ("wait GPU tasks mean s", lambda r: mean(r.wait["gpu"]), "{:.1f}"),
        ("wait 4-GPU tasks mean s", lambda r: mean(r.wait["gpu4"]), "{:.1f}"),
        ("wait 4-GPU tasks max s", lambda r: max(r.wait["gpu4"], default=0.0), "{:.0f}"),
        ("wait big CPU/mem tasks mean s", lambda r: mean(r.wait["big-cpu"]), "{:.1f}"),
        ("GPU utilisation %", lambda r: 100 * r.gpu_util, "{:.1f}"),
        ("idle GPU-s, GPU task waiting", lambda r: r.idle_gpu_s, "{:.0f}"),
        ("CPU tasks run on GPU nodes", lambda r: float(r.cpu_on_gpu), "{:.0f}"),
    ]
    header = f"{'metric':<31}{'policy':<15}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds)
    print(header + f"{'mean':>9}")
    for label, get, fmt in metrics:
        for i, (name, _, _) in enumerate(variants):
            values = [get(r) for r in results[name]]
            cells = "".join(f"{fmt.format(v):>9}" for v in values)
            average = fmt.format(statistics.fmean(values))
            print(f"{label if i == 0 else '':<31}{name:<15}{cells}{average:>9}")
    calls = sum(r.calls for rs in results.values() for r in rs)
    print(f"{calls} place() calls in {elapsed:.1f}s")


if __name__ == "__main__":
    main()
