"""Placement on a fake multi-node Ray cluster: taskray against plain Ray, one seeded workload.

    .venv/bin/python bench/placement.py [--tasks 150] [--seed 1] [--repeat 3] [--profile]

Cluster (``ray.cluster_utils.Cluster`` on this machine, loopback only): a head that runs
nothing, two CPU nodes (8 CPUs, 16 GiB each) and a GPU node (8 CPUs, 4 GPUs, 32 GiB).
Tasks only sleep, so the logical CPUs need not exist. The workload (seeded): small and
large CPU-only tasks, large-memory tasks and 1-4 GPU tasks, 0.5-3 s each, 20% of them at
high priority, in a mixed submission order.

(a) plain Ray: every task submitted at once as a Ray task with the same num_cpus /
    num_gpus / memory; (b) taskray: PostgreSQL store (a database of its own, created and
    dropped here), scheduler loop on a thread of this driver (``SchedulerConfig()``
    defaults), all tasks submitted with one ``submit_many``.

Every task records ``time.time()`` when its body starts and ends; wait = start - submit.
Idle GPU-seconds: over the timeline, the GPU node's free GPUs, counted while some waiting
GPU task asked for no more than that (the measure bench/placement_sim.py uses); time a
leased task spends waiting for its worker process counts as waiting.

Before each run the same warm-up starts 8 worker processes on every node (on the GPU node
4 of them holding a GPU), by a barrier; before taskray's run they also open its store.
``RAY_num_workers_soft_limit`` (``--soft-limit``; -1 leaves Ray's default) is set for every
Ray process, so both runs keep the same warm workers.

``--repeat N`` alternates N runs of each on the same cluster and reports means (the runs
are noisy on a small shared machine). ``--profile`` times the scheduler loop's calls and
splits taskray's idle GPU-seconds by why the GPU task that fit had not started, as the
latest placement pass saw it.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.ray_env  # noqa: F401  (sets Ray's environment; must come before ray)

# isort: split
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bench import handlers
from bench.ray_bench_common import (
    DEFAULT_ADMIN_URL,
    RUNTIME_ENV,
    LoopProfiler,
    SchedulerThread,
    ensure_ray_gone,
    fmt,
    mean,
    percentile,
    postgres_database,
    put_repo_on_pythonpath,
    ray_processes,
    table,
    wait_until,
)
from taskray.models import Resources, TaskSpec, TaskState
from taskray.scheduler.cluster import WORKER_METADATA_KEY
from taskray.scheduler.core import Scheduler, SchedulerConfig
from taskray.store import Store

GIB = 1 << 30
HIGH = 10
OBJECT_STORE = 200 * 1024 * 1024
CPU_NODE = {"num_cpus": 8, "memory": 16 * GIB, "object_store_memory": OBJECT_STORE}
GPU_NODE = {
    "num_cpus": 8,
    "num_gpus": 4,
    "memory": 32 * GIB,
    "object_store_memory": OBJECT_STORE,
}
NODES = (CPU_NODE, CPU_NODE, GPU_NODE)
EPS = 1e-9


@dataclass(frozen=True)
class Job:
    index: int
    kind: str
    priority: int
    cpus: float
    gpus: float
    memory: int
    duration: float


def workload(seed: int, n: int, high_share: float = 0.2) -> list[Job]:
    """``n`` seeded tasks in submission order; exactly ``high_share`` of them (those with
    the lowest priority draws) are high priority."""
    rng = random.Random(seed)
    shapes = []
    draws = []
    for _ in range(n):
        r = rng.random()
        gpus = 0
        if r < 0.38:
            kind, cpus, mem = "small", rng.choice((1, 1, 2)), rng.uniform(0.5, 2)
            dur = rng.uniform(0.5, 1.5)
        elif r < 0.60:
            kind, cpus, mem = "large-cpu", rng.choice((4, 6, 8)), rng.uniform(2, 6)
            dur = rng.uniform(1.5, 3.0)
        elif r < 0.75:
            kind, cpus, mem = "large-mem", 2, rng.uniform(9, 14)
            dur = rng.uniform(1.0, 3.0)
        else:
            gpus = rng.choice((1, 1, 1, 2, 2, 3, 4))
            kind, cpus, mem = f"gpu{gpus}", gpus, 4.0 * gpus
            dur = rng.uniform(0.5, 3.0)
        draws.append(rng.random())
        shapes.append((kind, float(cpus), float(gpus), round(mem * GIB), round(dur, 3)))
    high = set(sorted(range(n), key=draws.__getitem__)[: round(high_share * n)])
    return [
        Job(index, kind, HIGH if index in high else 0, cpus, gpus, memory, duration)
        for index, (kind, cpus, gpus, memory, duration) in enumerate(shapes)
    ]


# -- one run's timeline and what it measures --------------------------------------------------


@dataclass
class Timeline:
    label: str
    submit: list[float]
    start: list[float]
    end: list[float]
    node: list[str]
    pid: list[int]
    #: taskray only: when the scheduler leased each task (database clock, same host).
    leased: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def idle_gpu_seconds(jobs: Sequence[Job], tl: Timeline, gpu_total: float) -> tuple[float, float]:
    """GPU-seconds free on the GPU node while a waiting GPU task would have fit on them;
    the second figure is the part of it when such a task was already leased (taskray:
    waiting for its worker process or its executor, not for the scheduler)."""
    gpu_jobs = [j.index for j in jobs if j.gpus > 0]
    times = sorted({t for i in gpu_jobs for t in (tl.submit[i], tl.start[i], tl.end[i])})
    idle = leased_part = 0.0
    for a, b in itertools.pairwise(times):
        mid = (a + b) / 2
        busy = sum(jobs[i].gpus for i in gpu_jobs if tl.start[i] <= mid < tl.end[i])
        free = gpu_total - busy
        fitting = [
            i for i in gpu_jobs if tl.submit[i] <= mid < tl.start[i] and jobs[i].gpus <= free + EPS
        ]
        if not fitting:
            continue
        idle += free * (b - a)
        if tl.leased is not None and any(tl.leased[i] <= mid for i in fitting):
            leased_part += free * (b - a)
    return idle, leased_part


def attribute_idle(
    jobs: Sequence[Job],
    tl: Timeline,
    gpu_total: float,
    gpu_node: str,
    plans: Sequence[tuple[float, Any, Any]],
    views: Sequence[tuple[float, dict[str, float], dict[str, float]]],
) -> dict[str, float]:
    """Splits taskray's idle GPU-seconds by why the GPU task that fit had not started, as
    its latest ``place()`` call before each idle instant saw it. ``views`` are the
    profiler's (time, ledger free, usable free) of the ``read_nodes`` call of each pass."""
    gpu_jobs = [j.index for j in jobs if j.gpus > 0]
    times = sorted({t for i in gpu_jobs for t in (tl.submit[i], tl.start[i], tl.end[i])})
    plan_times = [p[0] for p in plans]
    paired = len(views) == len(plans)
    reasons: dict[str, float] = {}
    for a, b in itertools.pairwise(times):
        mid = (a + b) / 2
        busy = sum(jobs[i].gpus for i in gpu_jobs if tl.start[i] <= mid < tl.end[i])
        free = gpu_total - busy
        fitting = [
            i for i in gpu_jobs if tl.submit[i] <= mid < tl.start[i] and jobs[i].gpus <= free + EPS
        ]
        if not fitting:
            continue
        k = bisect.bisect_right(plan_times, mid) - 1
        # When the GPUs free now were last given back (the latest end of a GPU task).
        freed_at = max((tl.end[i] for i in gpu_jobs if tl.end[i] <= mid), default=-math.inf)
        if tl.leased is not None and any(tl.leased[i] <= mid for i in fitting):
            reason = "leased, its worker had not started it yet"
        elif k < 0:
            reason = "before the first placement pass"
        elif plan_times[k] < freed_at:
            reason = "no placement pass yet since the GPUs were freed"
        else:
            reason = _why_waiting(plans[k][1], plans[k][2], gpu_node)
            if reason.startswith("pass saw no room") and paired:
                _, ledger, usable = views[k]
                if usable.get("GPU", 0.0) + EPS < ledger.get("GPU", 0.0):
                    reason += ": Ray's view lagged the ledger"
                else:
                    reason += ": the store still showed the GPUs leased"
        reasons[reason] = reasons.get(reason, 0.0) + free * (b - a)
    return reasons


def _why_waiting(request: Any, plan: Any, gpu_node: str) -> str:
    view = next((n for n in request.nodes if n.node_id == gpu_node), None)
    if view is None:
        return "GPU node missing from the pass"
    free = dict(view.free)
    by_id = {t.task_id: t for t in request.tasks}
    for placed in plan.placements:
        if placed.node_id == gpu_node:
            for name, amount in by_id[placed.task_id].demand.items():
                free[name] = free.get(name, 0.0) - amount
    waiting = [by_id[t] for t in plan.waiting if by_id[t].needs_gpu]
    fitting = [t for t in waiting if t.demand.get("GPU", 0.0) <= free.get("GPU", 0.0) + EPS]
    if not fitting:
        return "pass saw no room on the GPUs"
    first = fitting[0]
    holder = plan.reservations.get(gpu_node)
    if holder is not None and holder != first.task_id:
        return "GPU node reserved for a higher-ranked task"
    if first.demand.get("CPU", 0.0) > free.get("CPU", 0.0) + EPS:
        return "GPU node's CPUs in use"
    if first.demand.get("memory", 0.0) > free.get("memory", 0.0) + EPS:
        return "GPU node's memory in use"
    return "held back by another rule"


def measure(jobs: Sequence[Job], tl: Timeline, gpu_node: str, gpu_total: float) -> dict[str, float]:
    waits = [tl.start[j.index] - tl.submit[j.index] for j in jobs]
    high = [waits[j.index] for j in jobs if j.priority >= HIGH]
    low = [waits[j.index] for j in jobs if j.priority < HIGH]
    gpu_waits = [waits[j.index] for j in jobs if j.gpus > 0]
    first = min(tl.submit)
    makespan = max(tl.end) - first
    idle, idle_leased = idle_gpu_seconds(jobs, tl, gpu_total)
    gpu_busy = sum(j.gpus * (tl.end[j.index] - tl.start[j.index]) for j in jobs)
    gpu_jobs = [j for j in jobs if j.gpus > 0]

    def gpu_task_fit_and_waited(at: float) -> bool:
        free = gpu_total - sum(
            j.gpus for j in gpu_jobs if tl.start[j.index] <= at < tl.end[j.index]
        )
        return any(
            tl.submit[j.index] <= at < tl.start[j.index] and j.gpus <= free + EPS for j in gpu_jobs
        )

    cpu_on_gpu = [j for j in jobs if j.gpus == 0 and tl.node[j.index] == gpu_node]
    cpu_on_gpu_blocking = [j for j in cpu_on_gpu if gpu_task_fit_and_waited(tl.start[j.index])]
    return {
        "high mean": mean(high),
        "high p95": percentile(high, 95),
        "low mean": mean(low),
        "low p95": percentile(low, 95),
        "gpu mean": mean(gpu_waits),
        "all mean": mean(waits),
        "idle gpu-s": idle,
        "idle gpu-s leased": idle_leased,
        "makespan": makespan,
        "gpu util": 100.0 * gpu_busy / (gpu_total * makespan),
        "cpu on gpu": float(len(cpu_on_gpu)),
        "cpu on gpu blocking": float(len(cpu_on_gpu_blocking)),
        "workers": float(len(set(tl.pid))),
        "last submit": max(tl.submit) - first,
    }


# -- warm-up ----------------------------------------------------------------------------------


def warm_cluster(
    nodes: Sequence[dict[str, Any]], timeout_s: float, database_url: str | None
) -> int:
    """8 worker processes on every node at once (on a GPU node, one per GPU hold a GPU), so
    Ray starts them all; with ``database_url`` each also opens taskray's store."""
    directory = tempfile.mkdtemp(prefix="trb-warm-")
    remote = ray.remote(num_cpus=1, max_retries=0)(handlers.barrier)
    try:
        refs = []
        for node in nodes:
            cpus = int(node["Resources"].get("CPU", 0))
            gpus = int(node["Resources"].get("GPU", 0))
            if cpus == 0:
                continue
            group = uuid.uuid4().hex[:8]
            strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            for k in range(cpus):
                refs.append(
                    remote.options(
                        scheduling_strategy=strategy, num_gpus=1 if k < gpus else 0
                    ).remote(directory, group, cpus, timeout_s, database_url)
                )
        return len(set(ray.get(refs, timeout=timeout_s + 30)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- the two runs -----------------------------------------------------------------------------


def run_plain_ray(jobs: Sequence[Job], gpu_worker: str, timeout_s: float) -> Timeline:
    reusable = ray.remote(num_cpus=1, max_retries=0)(handlers.timed_sleep_on_node)
    # As taskray's "fresh" executor: declared without GPUs, one call per process.
    fresh = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(handlers.timed_sleep_on_node)
    submit = [0.0] * len(jobs)
    refs = []
    for job in jobs:
        remote = fresh if job.gpus > 0 and gpu_worker == "fresh" else reusable
        options: dict[str, Any] = {"num_cpus": job.cpus, "num_gpus": job.gpus}
        if job.memory:
            options["memory"] = job.memory
        submit[job.index] = time.time()
        refs.append(remote.options(**options).remote(job.duration))
    out = ray.get(refs, timeout=timeout_s)
    return Timeline(
        "plain Ray",
        submit,
        [float(r["start"]) for r in out],
        [float(r["end"]) for r in out],
        [str(r["node"]) for r in out],
        [int(r["pid"]) for r in out],
    )


def specs_for(jobs: Sequence[Job], gpu_worker: str, timeout_factor: float) -> list[TaskSpec]:
    return [
        TaskSpec(
            type="bench.handlers:timed_sleep",
            payload={"args": [job.duration]},
            queue="placement",
            priority=job.priority,
            resources=Resources(num_cpus=job.cpus, num_gpus=job.gpus, memory=job.memory),
            metadata={WORKER_METADATA_KEY: gpu_worker} if job.gpus > 0 else {},
            timeout_s=round(timeout_factor * job.duration + 1.0, 3) if timeout_factor else None,
        )
        for job in jobs
    ]


def run_taskray(
    jobs: Sequence[Job], url: str, args: argparse.Namespace, profiler: LoopProfiler | None
) -> Timeline:
    store = Store.open(url, migrate=False)
    scheduler_store = Store.open(url, migrate=False)
    try:
        scheduler = Scheduler(scheduler_store, url, SchedulerConfig())
        if profiler is not None:
            profiler.instrument(scheduler)
        specs = specs_for(jobs, args.gpu_worker, args.task_timeout_factor)
        with SchedulerThread(scheduler) as thread:
            if profiler is not None:
                profiler.reset()
            submitted_at = time.time()
            ids = [r.task.id for r in store.submit_many(specs)]

            def done() -> bool:
                counts = store.count_by_status(queue="placement")
                bad = {
                    s: c
                    for s, c in counts.items()
                    if s.is_terminal and s is not TaskState.SUCCEEDED
                }
                if bad:
                    raise RuntimeError(f"tasks ended badly: {bad}")
                return counts.get(TaskState.SUCCEEDED, 0) == len(jobs)

            wait_until(done, args.timeout, "taskray run", interval_s=0.05, check=thread.check)
            report = profiler.report("taskray scheduler loop, placement run") if profiler else ""
        if profiler is not None:
            profiler.restore()
        tasks = store.get_many(ids)
    finally:
        scheduler_store.close()
        store.close()
    for t in tasks:
        assert t.result is not None and t.node_id is not None and t.leased_at is not None
    lifecycle = {
        "ready>leased": [(t.leased_at - t.scheduled_at).total_seconds() for t in tasks],  # type: ignore[operator]
        "leased>body (gpu)": [
            t.result["start"] - t.leased_at.timestamp()  # type: ignore[union-attr]
            for t in tasks
            if t.resources.num_gpus > 0
        ],
        "leased>body (cpu)": [
            t.result["start"] - t.leased_at.timestamp()  # type: ignore[union-attr]
            for t in tasks
            if t.resources.num_gpus == 0
        ],
        "body end>committed": [
            t.completed_at.timestamp() - t.result["end"]  # type: ignore[union-attr]
            for t in tasks
        ],
    }
    return Timeline(
        "taskray",
        [submitted_at] * len(jobs),
        [float(t.result["start"]) for t in tasks],
        [float(t.result["end"]) for t in tasks],
        [str(t.node_id) for t in tasks],
        [int(t.result["pid"]) for t in tasks],
        leased=[t.leased_at.timestamp() for t in tasks],  # type: ignore[union-attr]
        extra={
            "lifecycle": lifecycle,
            "profile": report,
            "profiler": profiler,
            "totals": dict(scheduler.totals),
        },
    )


# -- report -----------------------------------------------------------------------------------


def lower_bound(jobs: Sequence[Job]) -> float:
    gpu = sum(j.gpus * j.duration for j in jobs) / GPU_NODE["num_gpus"]  # type: ignore[operator]
    cpu = sum(j.cpus * j.duration for j in jobs) / sum(n["num_cpus"] for n in NODES)  # type: ignore[misc]
    return max(gpu, cpu, max(j.duration for j in jobs))


def describe(jobs: Sequence[Job]) -> str:
    kinds: dict[str, int] = {}
    for j in jobs:
        kinds[j.kind] = kinds.get(j.kind, 0) + 1
    high = sum(1 for j in jobs if j.priority >= HIGH)
    parts = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    return f"{len(jobs)} tasks ({parts}); {high} high priority"


TARGETS = {"high mean": 0.4, "idle gpu-s": 0.5, "makespan": 1.0}
METRICS = [
    ("high mean", "high-priority wait mean, s", 2),
    ("high p95", "high-priority wait p95, s", 2),
    ("low mean", "low-priority wait mean, s", 2),
    ("low p95", "low-priority wait p95, s", 2),
    ("gpu mean", "GPU-task wait mean, s", 2),
    ("all mean", "wait mean, all tasks, s", 2),
    ("idle gpu-s", "idle GPU-s while a GPU task fit", 1),
    ("idle gpu-s leased", "  of which that task was leased", 1),
    ("makespan", "makespan, s", 1),
    ("gpu util", "GPU utilisation, %", 1),
    ("cpu on gpu", "CPU-only tasks run on GPU node", 1),
    ("cpu on gpu blocking", "  started while a GPU task fit", 1),
    ("workers", "worker processes used", 1),
    ("last submit", "last submit after first, s", 3),
]


def verdict(key: str, ratio: float) -> str:
    target = TARGETS.get(key)
    if target is None or math.isnan(ratio):
        return ""
    return f"<= {target:.1f}: " + ("met" if ratio <= target + EPS else "MISSED")


def print_report(
    jobs: Sequence[Job],
    ray_ms: Sequence[dict[str, float]],
    tr_ms: Sequence[dict[str, float]],
    taskray_runs: Sequence[Timeline],
) -> None:
    reps = len(ray_ms)
    rows: list[list[object]] = []
    for key, label, digits in METRICS:
        a = mean([m[key] for m in ray_ms])
        b = mean([m[key] for m in tr_ms])
        ratio = b / a if a > 0 and key != "idle gpu-s leased" else math.nan
        rows.append(
            [
                label,
                "-" if key == "idle gpu-s leased" else fmt(a, digits),
                fmt(b, digits),
                "" if math.isnan(ratio) else fmt(ratio, 2),
                verdict(key, ratio),
            ]
        )
    title = f"mean of {reps} runs each" if reps > 1 else "one run each"
    print(f"Placement, {title} (ratio: taskray / plain Ray)")
    print(table(["metric", "plain Ray", "taskray", "ratio", "target"], rows))
    print(f"lower bound on makespan (GPU-s / GPUs, CPU-s / CPUs): {lower_bound(jobs):.1f}s")
    if reps > 1:
        print()
        per_rep = []
        for i, (a, b) in enumerate(zip(ray_ms, tr_ms, strict=True)):
            row: list[object] = [i + 1]
            for key in TARGETS:
                ratio = b[key] / a[key] if a[key] > 0 else math.nan
                row += [fmt(a[key], 2), fmt(b[key], 2), fmt(ratio, 2)]
            per_rep.append(row)
        print(
            table(
                ["run"] + [f"{k} {w}" for k in TARGETS for w in ("Ray", "taskray", "ratio")],
                per_rep,
            )
        )
    lifecycle: dict[str, list[float]] = {}
    for run in taskray_runs:
        for name, values in run.extra["lifecycle"].items():
            lifecycle.setdefault(name, []).extend(values)
    print()
    print("taskray task lifecycle, ms (leased/committed: database clock; body: task clock)")
    print(
        table(
            ["segment", "n", "mean", "p50", "p95", "max"],
            [
                [
                    name,
                    len(values),
                    fmt(1e3 * mean(values), 0),
                    fmt(1e3 * percentile(values, 50), 0),
                    fmt(1e3 * percentile(values, 95), 0),
                    fmt(1e3 * max(values), 0) if values else "n/a",
                ]
                for name, values in lifecycle.items()
            ],
        )
    )


def print_profile(
    jobs: Sequence[Job], runs: Sequence[Timeline], gpu_total: float, gpu_node: str
) -> None:
    reasons: dict[str, float] = {}
    for run in runs:
        profiler: LoopProfiler = run.extra["profiler"]
        found = attribute_idle(jobs, run, gpu_total, gpu_node, profiler.plans, profiler.free_views)
        for key, value in found.items():
            reasons[key] = reasons.get(key, 0.0) + value / len(runs)
    print()
    print(runs[-1].extra["profile"] + (" [last run]" if len(runs) > 1 else ""))
    print()
    print("taskray idle GPU-s by why the GPU task that fit had not started (mean per run)")
    print(
        table(
            ["why (as the latest placement pass saw it)", "GPU-s"],
            [[k, fmt(v, 1)] for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])],
        )
    )


def start_cluster() -> Cluster:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "object_store_memory": OBJECT_STORE,
        },
    )
    for node in NODES:
        cluster.add_node(**node)
    return cluster


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=150)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternating")
    parser.add_argument(
        "--soft-limit",
        type=int,
        default=16,
        help="RAY_num_workers_soft_limit for every Ray process (-1: Ray's default)",
    )
    parser.add_argument(
        "--gpu-worker",
        choices=("reuse", "fresh"),
        default="reuse",
        help="GPU tasks in warm worker processes, or a new process each (taskray's default "
        "for GPU tasks); the same for both runs",
    )
    parser.add_argument(
        "--task-timeout-factor",
        type=float,
        default=0.0,
        help="give each taskray task timeout_s = F * duration + 1 (lets the policy backfill "
        "around a reservation); 0: no timeouts",
    )
    parser.add_argument("--first", choices=("ray", "taskray"), default="ray", help="run order")
    parser.add_argument("--no-warmup", action="store_true", help="skip the worker warm-up")
    parser.add_argument("--profile", action="store_true", help="time the scheduler loop")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="PostgreSQL admin URL")
    parser.add_argument("--timeout", type=float, default=300.0, help="limit per run, s")
    args = parser.parse_args(argv)

    jobs = workload(args.seed, args.tasks)
    put_repo_on_pythonpath()
    if args.soft_limit >= 0:
        os.environ["RAY_num_workers_soft_limit"] = str(args.soft_limit)  # noqa: SIM112
    ray_tmpdir = os.environ["RAY_TMPDIR"]
    began = time.monotonic()
    runs: dict[str, list[Timeline]] = {"ray": [], "taskray": []}
    killed: list[int] = []
    cluster: Cluster | None = None
    gpu_node = ""
    try:
        cluster = start_cluster()
        ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, logging_level="WARNING")
        cluster.wait_for_nodes()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        gpu_node = next(n["NodeID"] for n in nodes if n["Resources"].get("GPU"))
        addresses = sorted({n["NodeManagerAddress"] for n in nodes})
        print(
            f"# Ray {ray.__version__}: head (0 CPUs) + 2 CPU nodes (8 CPUs, 16 GiB) + GPU node "
            f"(8 CPUs, 4 GPUs, 32 GiB); node addresses {', '.join(addresses)}; "
            f"{os.cpu_count()} real cores"
        )
        soft_limit = os.environ.get("RAY_num_workers_soft_limit", "(Ray default)")  # noqa: SIM112
        print(
            f"# RAY_num_workers_soft_limit={soft_limit}; GPU tasks run in {args.gpu_worker} "
            "worker processes in both runs; warm-up: "
            + ("none" if args.no_warmup else "8 workers per node before each run")
            + "; taskray task timeouts: "
            + (
                f"{args.task_timeout_factor:g} x duration + 1 s"
                if args.task_timeout_factor
                else "none"
            )
        )
        print(f"# workload seed {args.seed}: {describe(jobs)}", flush=True)
        order = ("ray", "taskray") if args.first == "ray" else ("taskray", "ray")
        for rep in range(args.repeat):
            for which in order:
                if which == "ray":
                    if not args.no_warmup:
                        warm_cluster(nodes, args.timeout, None)
                    runs["ray"].append(run_plain_ray(jobs, args.gpu_worker, args.timeout))
                else:
                    with postgres_database(args.admin_url) as url:
                        Store.open(url).close()  # migrates the new database
                        if not args.no_warmup:
                            warm_cluster(nodes, args.timeout, url)
                        profiler = LoopProfiler(keep_plans=True) if args.profile else None
                        runs["taskray"].append(run_taskray(jobs, url, args, profiler))
                done = runs[which][-1]
                print(
                    f"# run {rep + 1} {done.label}: makespan "
                    f"{max(done.end) - min(done.submit):.1f}s",
                    flush=True,
                )
    finally:
        before = ray_processes(ray_tmpdir)
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        killed = ensure_ray_gone(before, ray_tmpdir)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)

    gpu_total = float(GPU_NODE["num_gpus"])  # type: ignore[arg-type]
    ray_ms = [measure(jobs, tl, gpu_node, gpu_total) for tl in runs["ray"]]
    tr_ms = [measure(jobs, tl, gpu_node, gpu_total) for tl in runs["taskray"]]
    print()
    print_report(jobs, ray_ms, tr_ms, runs["taskray"])
    if args.profile:
        print_profile(jobs, runs["taskray"], gpu_total, gpu_node)
    print()
    print(
        f"# total {time.monotonic() - began:.0f}s; scheduler totals (last run) "
        f"{runs['taskray'][-1].extra['totals']}; Ray processes left and killed: {killed}"
    )


if __name__ == "__main__":
    main()
