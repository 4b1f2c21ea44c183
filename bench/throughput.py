"""No-op task throughput and dispatch latency: raw Ray against taskray on the same local Ray.

    .venv/bin/python bench/throughput.py [--tasks 2000] [--backend both|sqlite|postgresql]
                                         [--profile] [--window 256]

One process, one local Ray (``--num-cpus`` logical CPUs, default 4), all on loopback:

1. Warm-up (not timed): a barrier holds ``--num-cpus`` tasks at once, so that many worker
   processes are started (each also opens taskray's per-process store once a database
   exists), then ``--warmup`` no-op tasks run through whatever is measured next.
2. Raw Ray: ``--tasks`` no-op ``@ray.remote`` tasks (num_cpus=1) submitted at once, then
   ``ray.get`` on all of them.
3. taskray, per backend (a SQLite file in a temporary directory, and/or a PostgreSQL
   database of its own, created and dropped here), with the scheduler loop on a thread of
   this driver (``SchedulerConfig()`` defaults but ``--window``):
   - idle: ``--idle-tasks`` no-op tasks, each submitted after the previous one succeeded;
   - load: ``submit_many`` of ``--tasks`` no-op tasks, then wait until all succeeded.

Rates are tasks over wall-clock seconds from the first submission until all are done.
Dispatch latency is ready -> started (``started_at - scheduled_at``, both written by the
database clock), split into ready -> leased (the scheduler) and leased -> started (Ray
dispatch, worker pickup and the executor's start transaction). ``--profile`` times the
scheduler loop's calls during the load phase.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.ray_env  # noqa: F401  (sets Ray's environment; must come before ray)

# isort: split
import ray

from bench import handlers
from bench.ray_bench_common import (
    DEFAULT_ADMIN_URL,
    RUNTIME_ENV,
    LoopProfiler,
    SchedulerThread,
    database,
    ensure_ray_gone,
    fmt,
    percentile,
    put_repo_on_pythonpath,
    ray_processes,
    table,
    wait_until,
)
from taskray.models import Resources, Task, TaskSpec, TaskState
from taskray.scheduler.core import Scheduler, SchedulerConfig
from taskray.store import Store

NOOP = "bench.handlers:noop"


@ray.remote(num_cpus=1)
def raw_noop() -> None:
    return None


def warm_workers(size: int, timeout_s: float, database_url: str | None = None) -> set[int]:
    """Start ``size`` worker processes (the barrier holds them all at once)."""
    directory = tempfile.mkdtemp(prefix="trb-warm-")
    try:
        remote = ray.remote(num_cpus=1)(handlers.barrier)
        group = uuid.uuid4().hex[:8]
        refs = [remote.remote(directory, group, size, timeout_s, database_url) for _ in range(size)]
        return set(ray.get(refs, timeout=timeout_s + 30))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_raw(n: int, timeout_s: float) -> tuple[float, float]:
    """Seconds for ``n`` no-op tasks submitted at once until ``ray.get`` has them all, and
    the seconds the submission itself took."""
    started = time.perf_counter()
    refs = [raw_noop.remote() for _ in range(n)]
    submitted = time.perf_counter()
    ray.get(refs, timeout=timeout_s)
    return time.perf_counter() - started, submitted - started


def noop_specs(n: int, queue: str) -> list[TaskSpec]:
    return [TaskSpec(type=NOOP, queue=queue, resources=Resources(num_cpus=1)) for _ in range(n)]


def wait_queue_done(
    store: Store, queue: str, n: int, timeout_s: float, thread: SchedulerThread
) -> None:
    def done() -> bool:
        counts = store.count_by_status(queue=queue)
        bad = {s: c for s, c in counts.items() if s.is_terminal and s is not TaskState.SUCCEEDED}
        if bad:
            raise RuntimeError(f"queue {queue}: tasks ended badly: {bad}")
        return counts.get(TaskState.SUCCEEDED, 0) >= n

    wait_until(done, timeout_s, f"{n} tasks of queue {queue}", interval_s=0.02, check=thread.check)


def latencies_ms(tasks: Sequence[Task]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"ready>started": [], "ready>leased": [], "leased>started": []}
    for t in tasks:
        assert t.started_at is not None and t.leased_at is not None
        out["ready>started"].append((t.started_at - t.scheduled_at).total_seconds() * 1e3)
        out["ready>leased"].append((t.leased_at - t.scheduled_at).total_seconds() * 1e3)
        out["leased>started"].append((t.started_at - t.leased_at).total_seconds() * 1e3)
    return out


def run_taskray(backend: str, args: argparse.Namespace) -> dict[str, object]:
    with database(backend, args.admin_url) as url:
        store = Store.open(url)  # migrates the new database
        scheduler_store = Store.open(url, migrate=False)
        try:
            warm_workers(args.num_cpus, args.timeout, database_url=url)
            scheduler = Scheduler(scheduler_store, url, SchedulerConfig(window=args.window))
            profiler = LoopProfiler().instrument(scheduler) if args.profile else None
            with SchedulerThread(scheduler) as thread:
                store.submit_many(noop_specs(args.warmup, "warmup"))
                wait_queue_done(store, "warmup", args.warmup, args.timeout, thread)

                idle_ids = []
                for _ in range(args.idle_tasks):
                    task_id = store.submit(noop_specs(1, "idle")[0]).task.id
                    idle_ids.append(task_id)
                    ended = wait_until(
                        lambda task_id=task_id: (t := store.get(task_id)).status.is_terminal and t,
                        args.timeout,
                        f"idle task {task_id}",
                        interval_s=0.01,
                        check=thread.check,
                    )
                    if ended.status is not TaskState.SUCCEEDED:
                        raise RuntimeError(f"idle task {task_id} ended {ended.status.value}")

                specs = noop_specs(args.tasks, "load")
                if profiler is not None:
                    profiler.reset()
                started = time.perf_counter()
                load_ids = [r.task.id for r in store.submit_many(specs)]
                submitted = time.perf_counter()
                wait_queue_done(store, "load", args.tasks, args.timeout, thread)
                elapsed = time.perf_counter() - started
                report = profiler.report(f"scheduler loop, {backend}, load") if profiler else ""
            if profiler is not None:
                profiler.restore()
            idle = store.get_many(idle_ids)
            load = store.get_many(load_ids)
        finally:
            scheduler_store.close()
            store.close()
    return {
        "seconds": elapsed,
        "submit_seconds": submitted - started,
        "idle": latencies_ms(idle),
        "load": latencies_ms(load),
        "profile": report,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="no-op tasks per timed run")
    parser.add_argument("--idle-tasks", type=int, default=50, help="one-at-a-time tasks")
    parser.add_argument("--warmup", type=int, default=200, help="untimed no-ops before each")
    parser.add_argument(
        "--backend", choices=("both", "sqlite", "postgresql"), default="both", help="store"
    )
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument(
        "--window", type=int, default=SchedulerConfig().window, help="SchedulerConfig.window"
    )
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="PostgreSQL admin URL")
    parser.add_argument("--timeout", type=float, default=300.0, help="limit per phase, s")
    parser.add_argument(
        "--profile", action="store_true", help="time the scheduler loop's calls under load"
    )
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]

    put_repo_on_pythonpath()
    ray_tmpdir = os.environ["RAY_TMPDIR"]
    results: dict[str, dict[str, object]] = {}
    raw_seconds = raw_submit = float("nan")
    killed: list[int] = []
    began = time.monotonic()
    try:
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            runtime_env=RUNTIME_ENV,
            logging_level="WARNING",
        )
        addresses = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        print(
            f"# Ray {ray.__version__}, local, {args.num_cpus} logical CPUs on "
            f"{os.cpu_count()} cores, node address {', '.join(addresses)}"
        )
        print(
            f"# warm-up before each timed run: {args.num_cpus} worker processes started by a "
            f"barrier (taskray: each also opens its store), then {args.warmup} untimed no-ops"
        )
        warm_workers(args.num_cpus, args.timeout)
        ray.get([raw_noop.remote() for _ in range(args.warmup)], timeout=args.timeout)
        raw_seconds, raw_submit = run_raw(args.tasks, args.timeout)
        print(f"# raw Ray: {args.tasks} tasks in {raw_seconds:.2f}s", flush=True)
        for backend in backends:
            results[backend] = run_taskray(backend, args)
            print(
                f"# taskray/{backend}: {args.tasks} tasks in {results[backend]['seconds']:.2f}s",
                flush=True,
            )
    finally:
        before = ray_processes(ray_tmpdir)
        ray.shutdown()
        killed = ensure_ray_gone(before, ray_tmpdir)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)

    raw_rate = args.tasks / raw_seconds
    print()
    print(f"Throughput: {args.tasks} no-op tasks (num_cpus=1), submitted at once")
    rows: list[list[object]] = [
        [
            "raw Ray",
            args.tasks,
            f"{raw_submit:.2f}",
            f"{raw_seconds:.2f}",
            f"{raw_rate:.0f}",
            "1.000",
        ]
    ]
    for backend, r in results.items():
        seconds = float(r["seconds"])  # type: ignore[arg-type]
        rate = args.tasks / seconds
        rows.append(
            [
                f"taskray/{backend}",
                args.tasks,
                f"{float(r['submit_seconds']):.2f}",  # type: ignore[arg-type]
                f"{seconds:.2f}",
                f"{rate:.0f}",
                f"{rate / raw_rate:.3f}",
            ]
        )
    print(table(["path", "tasks", "submit s", "total s", "tasks/s", "vs raw"], rows))
    print()
    print(
        "taskray dispatch latency, ms (database clock): ready>started = ready>leased + "
        "leased>started"
    )
    rows = []
    for backend, r in results.items():
        for phase in ("idle", "load"):
            lat: dict[str, list[float]] = r[phase]  # type: ignore[assignment]
            row: list[object] = [f"{backend}/{phase}", len(lat["ready>started"])]
            for key in ("ready>started", "ready>leased", "leased>started"):
                row += [fmt(percentile(lat[key], 50)), fmt(percentile(lat[key], 99))]
            rows.append(row)
    print(
        table(
            [
                "backend/phase",
                "n",
                "ready>started p50",
                "p99",
                "ready>leased p50",
                "p99",
                "leased>started p50",
                "p99",
            ],
            rows,
        )
    )
    for r in results.values():
        if r["profile"]:
            print()
            print(r["profile"])
    print()
    print(f"# total {time.monotonic() - began:.0f}s; Ray processes left and killed: {killed}")


if __name__ == "__main__":
    main()
