"""What a user gets: taskray beside raw Ray and Celery, measured in one run, one table.

    .venv/bin/python bench/throughput.py [--backend all|ray,postgresql,sqlite,celery]
        [--tasks 5000] [--num-cpus 2] [--pickup-tasks 500] [--short-tasks 400]
        [--json PATH] [--profile DIR]

Systems (raw Ray always runs: every other figure is given as a ratio to it):

- raw Ray 2.60: one ``@ray.remote`` task per call, no durability;
- taskray/postgresql: a fresh database, created and dropped here;
- taskray/sqlite: a file in a temporary directory;
- Celery 5 + Redis (the floor to beat): a prefork worker with ``--num-cpus`` processes,
  broker and results on a Redis database of its own (flushed first); skipped, with a
  note, when celery is not installed (``pip install '.[bench]'``).

One local Ray (``--num-cpus`` logical CPUs) serves raw Ray and both taskray backends.
taskray is driven only through its public SDK, every setting at its default:
``taskray.init(database_url=...)`` joins that Ray and starts the scheduler actor,
``f.submit``/``f.map`` submit, ``taskray.get`` waits; between backends
``taskray.shutdown()`` and ``stop_scheduler()`` (a scheduler taskray did not start Ray
for is a detached actor that ``shutdown`` leaves running), and the actor is gone before
the next backend starts. Celery runs last, after Ray has shut down.

Measurements, per system (rates: tasks per wall-clock second):

1. submit one by one: ``--tasks`` no-op calls, one ``submit``/``remote``/``delay`` at a
   time; the rate of the submit calls alone (the tasks are then waited for, untimed);
2. bulk submit: ``--tasks`` no-op calls in one call (``f.map``, a list comprehension of
   ``.remote()``, a Celery ``group``); the rate of the submission alone;
3. drain: the same run as 2, until the last result is in: ``--tasks`` / (seconds from the
   start of submission to the last result);
4. pickup: ``--pickup-tasks`` tasks submitted one every 10 ms; each returns
   ``time.time()`` as it starts; pickup = that minus the time just before its submit
   call (p50, p99). A system that falls behind (its submit calls cannot keep the pace,
   or pickup grows along the run) is also measured one every 100 ms
   (``--slow-pickup-tasks``), and so is raw Ray, for the ratio;
5. short tasks: ``--short-tasks`` tasks sleeping 10 ms, submitted in bulk; CPU use =
   tasks x 10 ms / (num_cpus x wall seconds).

By default nothing is warmed up: each system is measured as a user who has just started
it gets it (taskray's scheduler warms its nodes' worker processes itself when it starts).
``--warmup N`` (opt-in, said in the output) runs N untimed tasks through the same path
before each measurement (submitted the same way and waited for; for pickup, at most 20
paced tasks), as a long-running cluster would have had. ``--profile DIR`` records the taskray
scheduler actor and one executor worker with py-spy (speedscope files, and a text summary)
during the taskray/postgresql drain.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.ray_env  # noqa: F401  (sets Ray's environment; must come before ray)

# isort: split
import psutil
import ray

import taskray
import taskray.scheduler.actor as scheduler_actor
from bench import handlers
from bench.ray_bench_common import (
    DEFAULT_ADMIN_URL,
    REPO_ROOT,
    RUNTIME_ENV,
    database,
    ensure_ray_gone,
    percentile,
    put_repo_on_pythonpath,
    ray_processes,
    table,
)

KINDS = ("noop", "started_at", "sleep_ms", "worker_pid", "taskray_file")
SYSTEMS = ("ray", "postgresql", "sqlite", "celery")
LABELS = {
    "ray": "raw Ray",
    "postgresql": "taskray/postgresql",
    "sqlite": "taskray/sqlite",
    "celery": "Celery+Redis",
}
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
#: The most paced tasks of the pickup warm-up (``--warmup``).
PICKUP_WARMUP = 20
SHORT_MS = 10.0


def log(message: str) -> None:
    print(f"# {message}", flush=True)


# -- the systems, each behind the same three calls --------------------------------------------


class RaySystem:
    """Raw Ray: one ``@ray.remote`` task per call (num_cpus=1, Ray's default)."""

    name = "ray"

    def __init__(self) -> None:
        self.fns = {k: ray.remote(num_cpus=1)(getattr(handlers, k)) for k in KINDS}

    def one(self, kind: str, arg: Any) -> Any:
        return self.fns[kind].remote(arg)

    def bulk(self, kind: str, args: Iterable[Any]) -> Any:
        fn = self.fns[kind]
        return [fn.remote(a) for a in args]

    def results(self, handles: Any, timeout: float) -> list[Any]:
        return list(ray.get(list(handles), timeout=timeout))


class TaskraySystem:
    """taskray through its public SDK only: ``taskray.task``, ``submit``, ``map``, ``get``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fns = {k: taskray.task(getattr(handlers, k)) for k in KINDS}

    def one(self, kind: str, arg: Any) -> Any:
        return self.fns[kind].submit(arg)

    def bulk(self, kind: str, args: Iterable[Any]) -> Any:
        return self.fns[kind].map(args, progress=False)

    def results(self, handles: Any, timeout: float) -> list[Any]:
        return list(taskray.get(list(handles), timeout=timeout, progress=False))


class CelerySystem:
    """Celery: ``.delay()`` per call, ``group(...).apply_async()`` in bulk."""

    name = "celery"

    def __init__(self) -> None:
        from bench import celery_app

        self.fns = {k: getattr(celery_app, k) for k in ("noop", "started_at", "sleep_ms")}

    def one(self, kind: str, arg: Any) -> Any:
        return self.fns[kind].delay(arg)

    def bulk(self, kind: str, args: Iterable[Any]) -> Any:
        from celery import group

        return group(self.fns[kind].s(a) for a in args).apply_async()

    def results(self, handles: Any, timeout: float) -> list[Any]:
        from celery.result import ResultSet

        if isinstance(handles, list):
            handles = ResultSet(handles)
        return list(handles.get(timeout=timeout))


# -- the measurements -------------------------------------------------------------------------


def measure_submit_one(system: Any, n: int, warmup: int, timeout: float) -> float:
    system.results([system.one("noop", i) for i in range(warmup)], timeout)
    started = time.perf_counter()
    handles = [system.one("noop", i) for i in range(n)]
    seconds = time.perf_counter() - started
    system.results(handles, timeout)  # untimed: the next measurement starts on an empty queue
    return n / seconds


def measure_bulk(
    system: Any,
    n: int,
    warmup: int,
    timeout: float,
    around: Callable[[], Callable[[], None]] | None = None,
) -> dict[str, float]:
    """Bulk submission and drain, from one run. ``around`` is called before the timed run
    and returns what to call right after it (the profiler)."""
    system.results(system.bulk("noop", range(warmup)), timeout)
    after = around() if around is not None else None
    try:
        started = time.perf_counter()
        handles = system.bulk("noop", range(n))
        submitted = time.perf_counter()
        system.results(handles, timeout)
        done = time.perf_counter()
    finally:
        if after is not None:
            after()
    return {
        "bulk_submit": n / (submitted - started),
        "drain": n / (done - started),
        "drain_s": done - started,
    }


def paced(system: Any, n: int, interval_s: float, timeout: float) -> dict[str, Any]:
    before: list[float] = []
    handles = []
    began = time.perf_counter()
    for i in range(n):
        # Sleeping is the pacing itself: one submit every interval_s, none skipped.
        time.sleep(max(0.0, began + i * interval_s - time.perf_counter()))
        before.append(time.time())
        handles.append(system.one("started_at", i))
    span = time.perf_counter() - began
    starts = system.results(handles, timeout)
    latencies = [(s - b) * 1e3 for s, b in zip(starts, before, strict=True)]
    k = max(1, n // 5)
    first, last = percentile(latencies[:k], 50), percentile(latencies[-k:], 50)
    behind_submit = span > 1.25 * (n - 1) * interval_s + 0.5
    growing = last > 2 * first + 5 * interval_s * 1e3
    return {
        "interval_ms": interval_s * 1e3,
        "n": n,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "first_fifth_p50_ms": first,
        "last_fifth_p50_ms": last,
        "submit_span_s": span,
        "kept_up": not (behind_submit or growing),
        "why_behind": (
            "submit calls slower than the pace"
            if behind_submit
            else "pickup grew along the run"
            if growing
            else ""
        ),
    }


def measure_pickup(
    system: Any, n: int, interval_s: float, timeout: float, warmup: int
) -> dict[str, Any]:
    if warmup:
        paced(system, min(PICKUP_WARMUP, warmup), interval_s, timeout)
    return paced(system, n, interval_s, timeout)


def measure_short(
    system: Any, n: int, warmup: int, num_cpus: int, timeout: float
) -> dict[str, float]:
    system.results(system.bulk("sleep_ms", [SHORT_MS] * warmup), timeout)
    started = time.perf_counter()
    system.results(system.bulk("sleep_ms", [SHORT_MS] * n), timeout)
    wall = time.perf_counter() - started
    return {"cpu_use_pct": 100.0 * n * SHORT_MS / 1e3 / (num_cpus * wall), "wall_s": wall}


def measure_all(
    system: Any,
    args: argparse.Namespace,
    around_drain: Callable[[], Callable[[], None]] | None = None,
) -> dict[str, Any]:
    label = LABELS[system.name]
    out: dict[str, Any] = {}
    log(f"{label}: submit one by one ({args.tasks})")
    out["submit_one"] = measure_submit_one(system, args.tasks, args.warmup, args.timeout)
    log(f"{label}: bulk submit and drain ({args.tasks})")
    out.update(measure_bulk(system, args.tasks, args.warmup, args.timeout, around_drain))
    log(f"{label}: pickup, one every 10 ms ({args.pickup_tasks})")
    out["pickup_10ms"] = measure_pickup(system, args.pickup_tasks, 0.010, args.timeout, args.warmup)
    if args.slow_pickup == "always" or (
        args.slow_pickup == "auto" and not out["pickup_10ms"]["kept_up"]
    ):
        if not out["pickup_10ms"]["kept_up"]:
            log(f"{label} fell behind at 10 ms ({out['pickup_10ms']['why_behind']})")
        log(f"{label}: pickup, one every 100 ms ({args.slow_pickup_tasks})")
        out["pickup_100ms"] = measure_pickup(
            system, args.slow_pickup_tasks, 0.100, args.timeout, args.warmup
        )
    log(f"{label}: short tasks ({args.short_tasks} x {SHORT_MS:g} ms)")
    out["short"] = measure_short(system, args.short_tasks, args.warmup, args.num_cpus, args.timeout)
    return out


# -- taskray: one backend at a time, the scheduler actor gone in between ----------------------


def scheduler_name() -> tuple[str, str]:
    return (
        getattr(scheduler_actor, "SCHEDULER_NAME", "taskray-scheduler"),
        getattr(scheduler_actor, "NAMESPACE", "taskray"),
    )


def scheduler_processes() -> list[psutil.Process]:
    """Our Ray's processes whose title names the scheduler actor's class."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith("ray::") and "SchedulerActor" in title:
            found.append(proc)
    return found


def scheduler_pid() -> int | None:
    name, namespace = scheduler_name()
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None
    try:
        return int(ray.get(handle.pid.remote(), timeout=10))
    except AttributeError:  # the actor has no pid method: find it by its process title
        procs = scheduler_processes()
        return procs[0].pid if len(procs) == 1 else None


def stop_taskray(timeout_s: float = 60.0) -> None:
    """``taskray.shutdown()``, then make sure the scheduler actor is gone: taskray leaves
    a scheduler it started on a Ray it did not start (a detached actor) running."""
    taskray.shutdown()
    name, namespace = scheduler_name()
    scheduler_actor.stop_scheduler(name)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get_actor(name, namespace=namespace)
            alive = True
        except ValueError:
            alive = False
        procs = scheduler_processes()
        if not alive and not procs:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the scheduler actor is still there after {timeout_s:g}s "
                f"(named: {alive}, processes: {[p.pid for p in procs]})"
            )
        time.sleep(0.2)  # Ray ends the killed actor's process asynchronously


def run_taskray(
    backend: str, args: argparse.Namespace, profiler: Profiler | None
) -> dict[str, Any]:
    with database(backend, args.admin_url) as url:
        taskray.init(database_url=url)
        try:
            system = TaskraySystem(backend)
            executor_file = system.results([system.one("taskray_file", 0)], args.timeout)[0]
            log(f"taskray/{backend}: an executor imported taskray from {executor_file}")
            around = None
            if profiler is not None and backend == "postgresql":
                around = profile_targets(system, args, profiler)
            return measure_all(system, args, around)
        finally:
            stop_taskray()


# -- py-spy -----------------------------------------------------------------------------------


class Profiler:
    """py-spy ``record`` on some pids, from ``start`` until ``stop`` (SIGINT: it then writes
    its file). Without ptrace permission it says so and the bench goes on."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.py_spy = found if Path(found).exists() else None
        self.running: list[tuple[str, subprocess.Popen[bytes], Path, Path]] = []
        self.files: list[Path] = []
        self.notes: list[str] = []

    def start(self, targets: dict[str, int]) -> None:
        if self.py_spy is None:
            self.notes.append("py-spy not found: pip install '.[bench]'; no profile recorded")
            return
        for label, pid in targets.items():
            out = self.directory / f"{label}-{pid}.speedscope.json"
            log_path = self.directory / f"{label}-{pid}.py-spy.log"
            cmd = [
                self.py_spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                "3600",
                "--rate",
                "100",
                "--idle",
                "--format",
                "speedscope",
                "--output",
                str(out),
            ]
            with log_path.open("wb") as sink:
                proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
            self.running.append((label, proc, out, log_path))
        time.sleep(1.5)  # let py-spy attach before the timed run starts
        for label, proc, _, log_path in list(self.running):
            if proc.poll() is not None:
                text = log_path.read_text(errors="replace").strip()
                if "ermission" in text or "ptrace" in text.lower():
                    why = (
                        "py-spy lacks permission to read another process (ptrace): run as "
                        "root, or with CAP_SYS_PTRACE, or set kernel.yama.ptrace_scope=0"
                    )
                else:
                    why = (
                        f"py-spy exited at once ({text.splitlines()[-1] if text else 'no output'})"
                    )
                self.notes.append(f"{label}: no profile: {why}")
                log(f"profile of {label}: {why}; carrying on")
                self.running.remove((label, proc, _, log_path))

    def stop(self) -> None:
        for _, proc, _, _ in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for label, proc, out, log_path in self.running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.notes.append(f"{label}: py-spy did not stop within 60 s; killed")
            if out.exists():
                self.files.append(out)
            else:
                self.notes.append(f"{label}: no profile written; see {log_path}")
        self.running = []


def profile_targets(
    system: TaskraySystem, args: argparse.Namespace, profiler: Profiler
) -> Callable[[], Callable[[], None]]:
    """What to profile during the drain: the scheduler actor, and the executor worker
    that ran most of a few warm-up tasks."""

    def start() -> Callable[[], None]:
        pids = system.results(system.bulk("worker_pid", range(4 * args.num_cpus)), args.timeout)
        worker, _ = Counter(pids).most_common(1)[0]
        targets = {"executor-worker": worker}
        pid = scheduler_pid()
        if pid is None:
            log("profile: cannot find the scheduler actor's process; profiling the worker only")
        else:
            targets = {"scheduler-actor": pid} | targets
        log(f"profile: py-spy on {targets} during the taskray/postgresql drain")
        profiler.start(targets)
        return profiler.stop

    return start


#: Leaf frames where a thread waits for nothing in particular (not on the database: a
#: psycopg ``Connection.wait`` leaf is a query in flight, and is counted as work).
IDLE_LEAVES = {
    "wait",
    "select",
    "poll",
    "epoll_wait",
    "sleep",
    "acquire",
    "_wait_for_tstate_lock",
    "main_loop",
    "run_task_loop",
}


def summarise_speedscope(path: Path, top: int = 12) -> str:
    """Per thread that did something: the share of its wall time (py-spy ``--idle``
    samples) under each function, under each line of taskray's own code, and in each
    leaf frame."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]

    def short(i: int) -> str:
        return "/".join(Path(frames[i].get("file") or "?").parts[-2:])

    lines = [f"{path.name}:"]
    longest = max(
        (float(sum(p.get("weights") or [1.0] * len(p["samples"]))) for p in data["profiles"]),
        default=0.0,
    )
    for profile in data["profiles"]:
        samples = profile["samples"]
        weights = profile.get("weights") or [1.0] * len(samples)
        total = float(sum(weights))
        if total < 0.05 * longest:
            continue  # a short-lived thread (one task's heartbeat, say)
        functions: Counter[str] = Counter()
        sites: Counter[str] = Counter()
        leaves: Counter[str] = Counter()
        for stack, w in zip(samples, weights, strict=True):
            for name in {f"{frames[i]['name']} ({short(i)})" for i in stack}:
                functions[name] += w
            for site in {
                f"{frames[i]['name']} ({short(i)}:{frames[i].get('line')})"
                for i in stack
                if "/taskray/" in (frames[i].get("file") or "")
            }:
                sites[site] += w
            if stack:
                leaves[frames[stack[-1]]["name"]] += w
        if not total or not leaves:
            continue
        busy = total - sum(
            w for name, w in leaves.items() if name.rsplit(".", 1)[-1] in IDLE_LEAVES
        )
        if busy < 0.02 * total:
            continue  # a thread that only waited
        unit = "s" if profile.get("unit") == "seconds" else "samples"
        lines.append(
            f"  {profile['name']}: {total:.1f} {unit} sampled, "
            f"{100 * busy / total:.0f}% not in an idle wait/sleep leaf"
        )
        lines.append("    functions (inclusive share of the thread's time):")
        shown = [(n, w) for n, w in functions.most_common() if w <= 0.97 * total][:top]
        lines += [f"      {100 * w / total:5.1f}%  {n}" for n, w in shown]
        if sites:
            lines.append("    taskray lines (inclusive):")
            shown = [(n, w) for n, w in sites.most_common() if w <= 0.97 * total][:top]
            lines += [f"      {100 * w / total:5.1f}%  {n}" for n, w in shown]
        lines.append(
            "    leaves: "
            + "; ".join(f"{100 * w / total:.0f}% {n}" for n, w in leaves.most_common(6))
        )
    return "\n".join(lines)


# -- Celery -----------------------------------------------------------------------------------


def celery_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("celery", "redis"))


def run_celery(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    os.environ["TASKRAY_BENCH_REDIS_URL"] = args.redis_url
    from bench import celery_app

    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    log_path = Path(tempfile.mkdtemp(prefix="trb-celery-")) / "worker.log"
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.celery_app",
        "worker",
        "--pool=prefork",
        f"--concurrency={args.num_cpus}",
        "--loglevel=WARNING",
        "-n",
        f"bench-{uuid.uuid4().hex[:8]}@%h",
    ]
    with log_path.open("wb") as sink:
        worker = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if worker.poll() is not None:
                raise RuntimeError(f"the celery worker exited; see {log_path}")
            try:
                if celery_app.ping.delay().get(timeout=1) == "pong":
                    break
            except Exception as exc:  # celery's TimeoutError, while the worker starts
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no answer from the celery worker; see {log_path}") from exc
        log(f"celery worker pid {worker.pid} answers (log: {log_path})")
        return measure_all(CelerySystem(), args)
    finally:
        try:
            family = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(True)]
        except psutil.NoSuchProcess:
            family = []
        worker.terminate()  # SIGTERM: Celery's warm shutdown, its pool with it
        _, alive = psutil.wait_procs(family, timeout=30)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        worker.wait(timeout=10)
        client.flushdb()
        client.close()


# -- the table --------------------------------------------------------------------------------


def fmt_value(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if digits == 0 and abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def fmt_ratio(ratio: float) -> str:
    if math.isnan(ratio) or math.isinf(ratio):
        return ""
    if ratio >= 10:
        return f" ({ratio:.0f}x)"
    if ratio >= 1:
        return f" ({ratio:.1f}x)"
    return f" ({ratio:.2g}x)"


ROWS: list[tuple[str, Callable[[dict[str, Any]], float | None], int]] = [
    ("submit one by one, tasks/s", lambda r: r.get("submit_one"), 0),
    ("bulk submit, tasks/s", lambda r: r.get("bulk_submit"), 0),
    ("drain (bulk, until all done), tasks/s", lambda r: r.get("drain"), 0),
    ("pickup @10ms p50, ms", lambda r: (r.get("pickup_10ms") or {}).get("p50_ms"), 1),
    ("pickup @10ms p99, ms", lambda r: (r.get("pickup_10ms") or {}).get("p99_ms"), 1),
    ("pickup @100ms p50, ms", lambda r: (r.get("pickup_100ms") or {}).get("p50_ms"), 1),
    ("pickup @100ms p99, ms", lambda r: (r.get("pickup_100ms") or {}).get("p99_ms"), 1),
    ("short 10 ms tasks, CPU use %", lambda r: (r.get("short") or {}).get("cpu_use_pct"), 0),
]


def render(results: dict[str, dict[str, Any]], skipped: dict[str, str]) -> str:
    systems = [s for s in SYSTEMS if s in results or s in skipped]
    raw = results.get("ray", {})
    rows = []
    for title, get, digits in ROWS:
        if not any(get(results[s]) is not None for s in results):
            continue
        row: list[object] = [title]
        for s in systems:
            if s in skipped:
                row.append("skipped")
                continue
            value = get(results[s])
            cell = fmt_value(value, digits)
            base = get(raw)
            if s != "ray" and value is not None and base:
                cell += fmt_ratio(value / base)
            key = "pickup_10ms" if "@10ms" in title else "pickup_100ms" if "@100ms" in title else ""
            if key and value is not None and not results[s][key]["kept_up"]:
                cell += " !"
            row.append(cell)
        rows.append(row)
    lines = [table(["measurement", *(LABELS[s] for s in systems)], rows)]
    if any(not r[k]["kept_up"] for r in results.values() for k in ("pickup_10ms",) if k in r):
        lines.append("! fell behind the pace: submit calls slower than it, or pickup grew")
    for s, why in skipped.items():
        lines.append(f"{LABELS[s]}: {why}")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        default="all",
        help="systems, comma-separated: ray, postgresql, sqlite, celery, or all (raw Ray "
        "always runs: it is the baseline)",
    )
    parser.add_argument("--tasks", type=int, default=5000, help="N of measurements 1-3")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of Ray, Celery")
    parser.add_argument("--pickup-tasks", type=int, default=500, help="pickup at 10 ms")
    parser.add_argument("--slow-pickup-tasks", type=int, default=200, help="pickup at 100 ms")
    parser.add_argument(
        "--slow-pickup",
        choices=("auto", "always", "never"),
        default="auto",
        help="pickup at 100 ms: for whoever fell behind at 10 ms (auto), all, or none",
    )
    parser.add_argument("--short-tasks", type=int, default=400, help="10 ms sleeps")
    parser.add_argument("--warmup", type=int, default=0, help="untimed tasks before each")
    parser.add_argument("--timeout", type=float, default=900.0, help="limit per wait, s")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="PostgreSQL admin URL")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Celery's Redis db")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the taskray/postgresql drain"
    )
    args = parser.parse_args(argv)
    chosen = {s.strip() for s in args.backend.split(",") if s.strip()}
    if "all" in chosen:
        chosen = set(SYSTEMS)
    unknown = chosen - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    args.systems = [s for s in SYSTEMS if s in chosen or s == "ray"]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    put_repo_on_pythonpath()
    ray_tmpdir = os.environ["RAY_TMPDIR"]
    profiler = Profiler(args.profile.resolve()) if args.profile else None
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    began = time.monotonic()
    killed: list[int] = []
    log(f"taskray imported from {taskray.__file__} (repo root {REPO_ROOT})")
    try:
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            runtime_env=RUNTIME_ENV,
            logging_level="WARNING",
        )
        log(
            f"Ray {ray.__version__}, local, {args.num_cpus} logical CPUs on {os.cpu_count()} "
            f"cores; Ray workers import taskray from "
            f"{ray.get(ray.remote(handlers.taskray_file).remote(), timeout=120)}"
        )
        log(
            f"warm-up before every measurement (untimed): {args.warmup} tasks through the same "
            f"path, waited for (pickup: {min(PICKUP_WARMUP, args.warmup)} paced tasks); bulk "
            "submit and drain "
            "are one run; taskray progress bars off"
        )
        ray_system = RaySystem()
        results["ray"] = measure_all(ray_system, args)
        for backend in ("postgresql", "sqlite"):
            if backend in args.systems:
                results[backend] = run_taskray(backend, args, profiler)
        if args.slow_pickup == "auto" and "pickup_100ms" not in results["ray"]:
            behind = [s for s, r in results.items() if "pickup_100ms" in r]
            if behind:
                log(f"raw Ray: pickup, one every 100 ms ({args.slow_pickup_tasks}), for the ratio")
                results["ray"]["pickup_100ms"] = measure_pickup(
                    ray_system, args.slow_pickup_tasks, 0.100, args.timeout, args.warmup
                )
    finally:
        taskray.shutdown()
        before = ray_processes(ray_tmpdir)
        ray.shutdown()
        killed = ensure_ray_gone(before, ray_tmpdir)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    if "celery" in args.systems:
        if celery_available():
            log("Celery runs after Ray has shut down: the machine is its own")
            results["celery"] = run_celery(args)
        else:
            skipped["celery"] = "skipped: pip install '.[bench]'"

    print()
    print(
        f"{args.tasks} no-op tasks (measurements 1-3), {args.pickup_tasks} pickups, "
        f"{args.short_tasks} short tasks; {args.num_cpus} CPUs; (ratio to raw Ray, same run)"
    )
    print(render(results, skipped))
    summaries = []
    if profiler is not None:
        print()
        for note in profiler.notes:
            print(f"profile: {note}")
        for path in profiler.files:
            summaries.append(summarise_speedscope(path))
        if summaries:
            summary_path = profiler.directory / "summary.txt"
            summary_path.write_text("\n\n".join(summaries) + "\n")
            print(f"profiles (speedscope, open at speedscope.app) in {profiler.directory}:")
            for path in profiler.files:
                print(f"  {path}")
            print(f"  {summary_path} (what follows)")
            print()
            print("\n\n".join(summaries))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": {
                        k: v if isinstance(v, int | float | str | list) or v is None else str(v)
                        for k, v in vars(args).items()
                    },
                    "taskray_file": taskray.__file__,
                    "results": results,
                    "skipped": skipped,
                    "profiles": [str(p) for p in profiler.files] if profiler else [],
                },
                indent=2,
            )
        )
        print(f"figures written to {args.json}")
    print(f"# total {time.monotonic() - began:.0f}s; Ray processes left and killed: {killed}")


if __name__ == "__main__":
    main()
