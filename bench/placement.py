"""Placement on a fake multi-node Ray cluster: taskray against plain Ray, one seeded workload.

    .venv/bin/python bench/placement.py [--tasks 150] [--seed 1] [--repeat 2]
        [--warmup none|both|taskray] [--soft-limit N] [--gpu-worker reuse|fresh]
        [--task-timeout-factor F] [--first ray|taskray] [--profile]

What a user gets by default. Cluster (``ray.cluster_utils.Cluster`` on this machine,
loopback only): a head that runs nothing, two CPU nodes (8 CPUs, 16 GiB each) and a GPU
node (8 CPUs, 4 GPUs, 32 GiB). Tasks only sleep, so the logical CPUs need not exist. The
workload (seeded): small and large CPU-only tasks, large-memory tasks and 1-4 GPU tasks,
0.5-3 s each, 20% of them at high priority, in a mixed submission order.

(a) plain Ray: a driver of its own (``ray.init(address=...)``) submits every task at once
    as a Ray task with the same num_cpus / num_gpus / memory (one function declared
    without GPUs, resources set per call with ``.options``); ``ray.get`` waits.
(b) taskray, through its public SDK only, every setting at its default:
    ``taskray.init(database_url=<a PostgreSQL database of its own>, ray_address=...)``
    joins the cluster and starts the scheduler actor (detached, ``SchedulerConfig()``);
    each task is ``@taskray.task`` ``.options(num_cpus=, num_gpus=, memory=, priority=)``
    ``.submit(duration)`` in workload order (no ``worker=``, no timeout); ``taskray.get``
    waits. Afterwards ``stop_scheduler()``, ``taskray.shutdown()`` and ``ray.shutdown()``.

Each run is a Ray job of its own and starts cold: before it, the bench waits until no
worker process of an earlier run is left. ``--warmup`` (opt-in, said in the output):
``both`` starts 8 worker processes on every node (on the GPU node 4 of them holding a GPU)
by a barrier before each run, in the run's own job (for taskray they also import its
executor and open its store); ``taskray`` does that before taskray's runs only (a
prototype of a scheduler that pre-starts warm executors when it starts).
``RAY_num_workers_soft_limit`` is Ray's default unless ``--soft-limit`` sets it for every
Ray process.

Every task records ``time.time()`` when its body starts and ends, its pid, and when its
worker process was created; wait = start - that task's submit call. Idle GPU-seconds: over
the timeline, the GPU node's free GPUs, counted while some waiting GPU task asked for no
more than that (the measure bench/placement_sim.py uses); time a leased task spends
waiting for its worker process counts as waiting. taskray's lease times and attempts come
from its database (``tasks``, ``task_attempts``); the bench splits each task's wait into
queue (submit > lease), Ray (lease > worker process created, for a task that was its
worker's first) and worker start (process created > body), for both systems.

``--repeat N`` alternates N runs of each on the same cluster and reports means (the runs
are noisy on a small shared machine). ``--profile`` (a diagnostic, not the default path)
runs the scheduler on a thread of this driver instead of the actor, times its calls and
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
import subprocess
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
import psutil
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import taskray
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
    ray_worker_processes,
    table,
    wait_for_no_workers,
)
from taskray.scheduler import actor as scheduler_actor
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
    #: When each task's worker process was created (this host's clock).
    born: list[float]
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


# -- warm-up (opt-in) -------------------------------------------------------------------------


def warm_cluster(
    nodes: Sequence[dict[str, Any]], timeout_s: float, database_url: str | None
) -> int:
    """8 worker processes on every node at once (on a GPU node, one per GPU hold a GPU), so
    Ray starts them all; with ``database_url`` each also imports taskray's executor and
    opens its store. Runs in the current job, whose workers the next run reuses."""
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


def code_version() -> str:
    """The commit the workers run, and whether taskray's files differ from it (the
    workers import taskray from this working tree)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip()

    changed = git("status", "--short", "--", "taskray").splitlines()
    return f"{git('rev-parse', '--short', 'HEAD')}" + (
        f" + {len(changed)} uncommitted change(s) under taskray/" if changed else ""
    )


def warm_node_agents(nodes: Sequence[dict[str, Any]], database_url: str) -> int:
    """Start taskray's per-node agents now (when this taskray version has them), as a
    scheduler could when it starts; returns how many."""
    from taskray.scheduler import cluster as taskray_cluster

    agent_for = getattr(taskray_cluster, "agent_for", None)
    if agent_for is None:
        return 0
    agents = [agent_for(n["NodeID"], database_url) for n in nodes if n["Resources"].get("CPU")]
    ray.get([a.ready.remote() for a in agents], timeout=120)
    return len(agents)


def helper_processes() -> dict[str, list[float]]:
    """When taskray's own actors' processes (the scheduler, node agents) were created, by
    class name: they are worker processes too, started on the same machine as the run's."""
    found: dict[str, list[float]] = {}
    for proc in ray_worker_processes():
        try:
            title = " ".join(proc.cmdline())
            created = proc.create_time()
        except psutil.Error:
            continue
        for name in ("_SchedulerActor", "_NodeAgent"):
            if title.startswith(f"ray::{name}"):
                found.setdefault(name, []).append(created)
    return {name: sorted(times) for name, times in found.items()}


def cold_start(timeout_s: float = 20.0) -> None:
    """No worker process of an earlier run left. Idle workers that outlive their job (seen
    here: the executors of a stopped scheduler actor, for minutes) are ended by pid."""
    if not wait_for_no_workers(timeout_s):
        return
    idle = []
    for proc in ray_worker_processes():
        try:
            if " ".join(proc.cmdline()).strip() == "ray::IDLE":
                proc.kill()
                idle.append(proc)
        except psutil.Error:
            continue
    psutil.wait_procs(idle, timeout=10)
    left = wait_for_no_workers(10.0)
    print(
        f"# cold start: ended {len(idle)} idle worker process(es) an earlier run left"
        + (f"; {left} other(s) still there" if left else ""),
        flush=True,
    )


def run_plain_ray(
    jobs: Sequence[Job], address: str, nodes: Sequence[dict[str, Any]], args: argparse.Namespace
) -> Timeline:
    """A driver of its own: every task at once, then ``ray.get``."""
    cold_start()
    ray.init(address=address, runtime_env=RUNTIME_ENV, logging_level="WARNING")
    try:
        warmed = warm_cluster(nodes, args.timeout, None) if args.warmup == "both" else 0
        reusable = ray.remote(num_cpus=1, max_retries=0)(handlers.traced_sleep)
        # As taskray's worker="fresh": declared without GPUs, one call per process.
        fresh = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(handlers.traced_sleep)
        submit = [0.0] * len(jobs)
        refs = []
        for job in jobs:
            remote = fresh if job.gpus > 0 and args.gpu_worker == "fresh" else reusable
            options: dict[str, Any] = {"num_cpus": job.cpus, "num_gpus": job.gpus}
            if job.memory:
                options["memory"] = job.memory
            submit[job.index] = time.time()
            refs.append(remote.options(**options).remote(job.duration))
        out = ray.get(refs, timeout=args.timeout)
    finally:
        ray.shutdown()
    return Timeline(
        "plain Ray",
        submit,
        [float(r["start"]) for r in out],
        [float(r["end"]) for r in out],
        [str(r["node"]) for r in out],
        [int(r["pid"]) for r in out],
        [float(r["born"]) for r in out],
        extra={"warmed": warmed},
    )


def task_options(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    """The job's ``.options(...)``: its resources and priority, nothing else by default."""
    options: dict[str, Any] = {"num_cpus": job.cpus, "num_gpus": job.gpus}
    if job.memory:
        options["memory"] = job.memory
    if job.priority:
        options["priority"] = job.priority
    if job.gpus > 0 and args.gpu_worker == "fresh":
        options["worker"] = "fresh"
    if args.task_timeout_factor:
        options["timeout"] = round(args.task_timeout_factor * job.duration + 1.0, 3)
    return options


def run_taskray(
    jobs: Sequence[Job],
    url: str,
    address: str,
    nodes: Sequence[dict[str, Any]],
    args: argparse.Namespace,
    profiler: LoopProfiler | None,
) -> Timeline:
    """taskray as a user runs it: ``init`` (the scheduler actor), ``submit``, ``get``.

    With ``profiler``, the scheduler runs on a thread of this driver instead of the actor
    (same ``SchedulerConfig()``), so its calls can be timed."""
    cold_start()
    init_started = time.monotonic()
    runtime = taskray.init(
        database_url=url,
        ray_address=address,
        runtime_env=RUNTIME_ENV,
        start_scheduler_actor=profiler is None,
    )
    init_s = time.monotonic() - init_started
    thread: SchedulerThread | None = None
    scheduler_store: Store | None = None
    report = ""
    try:
        warmed = 0
        if args.warmup != "none":
            warmed = warm_cluster(nodes, args.timeout, url)
            warmed += warm_node_agents(nodes, url)
        if profiler is not None:
            scheduler_store = Store.open(url, migrate=False)
            scheduler = Scheduler(scheduler_store, url, SchedulerConfig())
            profiler.instrument(scheduler)
            thread = SchedulerThread(scheduler).__enter__()
            profiler.reset()
        sleeper = taskray.task(handlers.traced_sleep)
        submit = [0.0] * len(jobs)
        handles = []
        for job in jobs:
            submit[job.index] = time.time()
            handles.append(sleeper.options(**task_options(job, args)).submit(job.duration))
        out = taskray.get(handles, timeout=args.timeout, progress=False)
        if thread is not None and profiler is not None:
            thread.check()
            status = thread.scheduler.status()
            report = profiler.report("taskray scheduler loop, placement run")
        else:
            status = ray.get(runtime.scheduler.status.remote(), timeout=30)
        helpers = helper_processes()
        store = runtime.store
        tasks = store.get_many([h.id for h in handles])  # type: ignore[attr-defined]
        attempts = [store.attempts(h.id) for h in handles]
    finally:
        if thread is not None:
            thread.__exit__(None, None, None)
        if profiler is not None:
            profiler.restore()
        if scheduler_store is not None:
            scheduler_store.close()
        scheduler_actor.stop_scheduler()
        taskray.shutdown()
        ray.shutdown()
    for task, tried in zip(tasks, attempts, strict=True):
        assert task.leased_at is not None and task.node_id is not None and tried
    return Timeline(
        "taskray",
        submit,
        [float(r["start"]) for r in out],
        [float(r["end"]) for r in out],
        [str(t.node_id) for t in tasks],
        [int(r["pid"]) for r in out],
        [float(r["born"]) for r in out],
        leased=[t.leased_at.timestamp() for t in tasks],  # type: ignore[union-attr]
        extra={
            "warmed": warmed,
            "init_s": init_s,
            "attempts": [len(a) for a in attempts],
            "committed": [t.completed_at.timestamp() for t in tasks],  # type: ignore[union-attr]
            "profile": report,
            "profiler": profiler,
            "status": status,
            "helpers": helpers,
        },
    )


# -- where the waiting goes -------------------------------------------------------------------


def first_on_worker(tl: Timeline) -> list[bool]:
    """Per task: was it the first its worker process ran (a cold start, unless warmed)?"""
    first: dict[int, int] = {}
    for i in sorted(range(len(tl.pid)), key=tl.start.__getitem__):
        first.setdefault(tl.pid[i], i)
    return [first[tl.pid[i]] == i for i in range(len(tl.pid))]


def segments(jobs: Sequence[Job], tl: Timeline) -> dict[str, list[float]]:
    """Each task's wait split into segments, seconds. A task "on a new worker" was the
    first its worker process ran and that process did not exist when it was submitted; its
    wait is then (taskray) submit > leased > worker process created > body, or (plain
    Ray, which leases a worker when it has room) submit > worker process created > body.
    Worker created > body is Ray starting the process, importing, and (taskray) the
    executor opening its store and marking the task started."""
    firsts = first_on_worker(tl)
    since = "leased" if tl.leased is not None else "submit"
    out: dict[str, list[float]] = {}
    for job in jobs:
        i = job.index
        kind = "gpu" if job.gpus > 0 else "cpu"
        ref = tl.leased[i] if tl.leased is not None else tl.submit[i]
        found: list[tuple[str, float]] = []
        if tl.leased is not None:
            found.append((f"submit > leased [{kind}]", tl.leased[i] - tl.submit[i]))
        if firsts[i] and tl.born[i] > tl.submit[i]:
            found.append((f"{since} > worker created, new worker [{kind}]", tl.born[i] - ref))
            found.append((f"worker created > body, new worker [{kind}]", tl.start[i] - tl.born[i]))
        else:
            found.append((f"{since} > body, warm worker [{kind}]", tl.start[i] - ref))
        for name, value in found:
            out.setdefault(name, []).append(value)
    return out


def worker_counts(jobs: Sequence[Job], tl: Timeline) -> dict[str, float]:
    """Tasks that ran on a worker process created after they were submitted, by kind; and
    when the first GPU task's body started, after the first submit."""
    firsts = first_on_worker(tl)
    new = [j for j in jobs if firsts[j.index] and tl.born[j.index] > tl.submit[j.index]]
    first_gpu = min((tl.start[j.index] for j in jobs if j.gpus > 0), default=math.nan)
    return {
        "new workers (gpu tasks)": float(sum(1 for j in new if j.gpus > 0)),
        "new workers (cpu tasks)": float(sum(1 for j in new if j.gpus == 0)),
        "first GPU body after first submit, s": first_gpu - min(tl.submit),
    }


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


#: The issue's targets, taskray / plain Ray.
TARGETS = {"high mean": 0.4, "idle gpu-s": 0.5, "makespan": 0.9}
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
    ("new workers (gpu tasks)", "GPU tasks on a new worker process", 1),
    ("new workers (cpu tasks)", "CPU tasks on a new worker process", 1),
    ("first GPU body after first submit, s", "first GPU task started after, s", 2),
    ("last submit", "last submit after first, s", 3),
]
NO_RATIO = ("idle gpu-s leased",)


def verdict(key: str, ratio: float) -> str:
    target = TARGETS.get(key)
    if target is None or math.isnan(ratio):
        return ""
    return f"<= {target:.1f}: " + ("met" if ratio <= target + EPS else "MISSED")


def segment_table(runs: Sequence[Timeline], jobs: Sequence[Job]) -> str:
    found: dict[str, list[float]] = {}
    for run in runs:
        for name, values in segments(jobs, run).items():
            found.setdefault(name, []).extend(values)
    return table(
        ["segment", "n", "mean", "p50", "p95", "max"],
        [
            [
                name,
                len(values),
                fmt(1e3 * mean(values), 0),
                fmt(1e3 * percentile(values, 50), 0),
                fmt(1e3 * percentile(values, 95), 0),
                fmt(1e3 * max(values), 0),
            ]
            for name, values in sorted(found.items())
        ],
    )


def print_report(
    jobs: Sequence[Job],
    ray_ms: Sequence[dict[str, float]],
    tr_ms: Sequence[dict[str, float]],
    runs: dict[str, list[Timeline]],
) -> None:
    reps = len(ray_ms)
    rows: list[list[object]] = []
    for key, label, digits in METRICS:
        a = mean([m[key] for m in ray_ms])
        b = mean([m[key] for m in tr_ms])
        ratio = b / a if a > 0 and key not in NO_RATIO else math.nan
        rows.append(
            [
                label,
                "-" if key in NO_RATIO else fmt(a, digits),
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
    for which, label in (("ray", "plain Ray"), ("taskray", "taskray")):
        print()
        print(
            f"{label}: where each task's wait went, ms (all runs; lease: database clock, "
            "the rest: this host's clock)"
        )
        print(segment_table(runs[which], jobs))
    committed = [
        c - e
        for run in runs["taskray"]
        for c, e in zip(run.extra["committed"], run.end, strict=True)
    ]
    for i, run in enumerate(runs["taskray"]):
        first = min(run.submit)
        first_lease = min(run.leased or [math.nan])
        parts = [
            f"{name} x{len(times)} created at "
            + ", ".join(f"{t - first:+.1f}" for t in times)
            + " s"
            for name, times in run.extra["helpers"].items()
        ]
        print(
            f"taskray run {i + 1}: taskray.init took {run.extra['init_s']:.1f} s (it returns "
            f"once the scheduler has warmed the nodes); first lease "
            f"{first_lease - first:+.2f} s after the first submit; " + "; ".join(parts)
        )
    retried = sum(sum(n > 1 for n in run.extra["attempts"]) for run in runs["taskray"])
    print(
        f"taskray body end > committed: mean {1e3 * mean(committed):.0f} ms, p95 "
        f"{1e3 * percentile(committed, 95):.0f} ms; tasks with more than one attempt: {retried}"
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
        "--warmup",
        choices=("none", "both", "taskray"),
        default="none",
        help="start 8 worker processes per node before each run: none (the default: what a "
        "user gets), both, or taskray's runs only (with its executor imported)",
    )
    parser.add_argument(
        "--soft-limit",
        type=int,
        default=-1,
        help="RAY_num_workers_soft_limit for every Ray process (-1, the default: Ray's own)",
    )
    parser.add_argument(
        "--gpu-worker",
        choices=("reuse", "fresh"),
        default="reuse",
        help="GPU tasks in warm worker processes (the default of both), or a new process each "
        '(taskray: worker="fresh"; plain Ray: max_calls=1)',
    )
    parser.add_argument(
        "--task-timeout-factor",
        type=float,
        default=0.0,
        help="give each taskray task timeout = F * duration + 1 s (lets the policy backfill "
        "around a reservation); 0, the default: no timeouts",
    )
    parser.add_argument("--first", choices=("ray", "taskray"), default="ray", help="run order")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="diagnostic: the scheduler on a driver thread (not the actor), its calls timed",
    )
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
        address = cluster.address
        ray.init(address=address, logging_level="WARNING")
        cluster.wait_for_nodes()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        ray.shutdown()  # every run is a job (a driver) of its own
        gpu_node = next(n["NodeID"] for n in nodes if n["Resources"].get("GPU"))
        addresses = sorted({n["NodeManagerAddress"] for n in nodes})
        print(
            f"# Ray {ray.__version__}: head (0 CPUs) + 2 CPU nodes (8 CPUs, 16 GiB) + GPU node "
            f"(8 CPUs, 4 GPUs, 32 GiB); node addresses {', '.join(addresses)}; "
            f"{os.cpu_count()} real cores; load average {os.getloadavg()[0]:.1f}"
        )
        soft_limit = os.environ.get("RAY_num_workers_soft_limit", "Ray's default")  # noqa: SIM112
        warmup = {
            "none": "none (every run starts with no worker process)",
            "both": "8 workers per node before each run, both systems",
            "taskray": "8 workers per node (executor imported) before taskray's runs only",
        }[args.warmup]
        print(
            f"# taskray: SDK + scheduler actor, SchedulerConfig() and task options at their "
            f"defaults; GPU tasks: {args.gpu_worker} workers in both runs; taskray task "
            "timeouts: "
            + (
                f"{args.task_timeout_factor:g} x duration + 1 s"
                if args.task_timeout_factor
                else "none"
            )
            + ("; PROFILE: scheduler on a driver thread" if args.profile else "")
        )
        print(
            f"# warm-up: {warmup}; RAY_num_workers_soft_limit: {soft_limit}; taskray code: "
            f"{code_version()}"
        )
        print(f"# workload seed {args.seed}: {describe(jobs)}", flush=True)
        order = ("ray", "taskray") if args.first == "ray" else ("taskray", "ray")
        for rep in range(args.repeat):
            for which in order:
                if which == "ray":
                    runs["ray"].append(run_plain_ray(jobs, address, nodes, args))
                else:
                    with postgres_database(args.admin_url) as url:
                        profiler = LoopProfiler(keep_plans=True) if args.profile else None
                        runs["taskray"].append(
                            run_taskray(jobs, url, address, nodes, args, profiler)
                        )
                done = runs[which][-1]
                print(
                    f"# run {rep + 1} {done.label}: makespan "
                    f"{max(done.end) - min(done.submit):.1f}s, load average "
                    f"{os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        before = ray_processes(ray_tmpdir)
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        killed = ensure_ray_gone(before, ray_tmpdir)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)

    gpu_total = float(GPU_NODE["num_gpus"])  # type: ignore[arg-type]
    ray_ms = [
        measure(jobs, tl, gpu_node, gpu_total) | worker_counts(jobs, tl) for tl in runs["ray"]
    ]
    tr_ms = [
        measure(jobs, tl, gpu_node, gpu_total) | worker_counts(jobs, tl) for tl in runs["taskray"]
    ]
    print()
    print_report(jobs, ray_ms, tr_ms, runs)
    if args.profile:
        print_profile(jobs, runs["taskray"], gpu_total, gpu_node)
    status = runs["taskray"][-1].extra["status"]
    print()
    print(
        f"# total {time.monotonic() - began:.0f}s; scheduler totals (last run) "
        f"{status.get('totals')}; Ray processes left and killed: {killed}"
    )


if __name__ == "__main__":
    main()
