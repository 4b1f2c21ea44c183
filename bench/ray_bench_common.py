"""What bench/throughput.py and bench/placement.py share: databases of their own, the
scheduler on a driver thread, waiting with deadlines, percentiles, and making sure no Ray
process of theirs outlives them.

Importing this module does not import Ray: the scripts set Ray's environment first.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
#: Workers import ``bench.handlers`` and ``taskray`` from the repository.
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": REPO_ROOT}}
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def put_repo_on_pythonpath() -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p
    )


# -- numbers ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- waiting ----------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], Any],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.05,
    check: Callable[[], None] | None = None,
) -> Any:
    """Poll ``condition`` until it returns something truthy; ``TimeoutError`` after
    ``timeout_s``. ``check`` runs between polls (to fail fast when a helper thread died)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout_s:g}s")
        time.sleep(interval_s)


# -- databases --------------------------------------------------------------------------------


@contextmanager
def postgres_database(admin_url: str = DEFAULT_ADMIN_URL) -> Iterator[str]:
    """A new, empty, uniquely named database; dropped afterwards (connections forced off)."""
    from taskray.store.engine import normalise_url

    admin = sa.create_engine(
        normalise_url(admin_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    name = f"taskray_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def sqlite_database() -> Iterator[str]:
    """A SQLite file in a temporary directory, removed afterwards."""
    directory = tempfile.mkdtemp(prefix="taskray-bench-sqlite-")
    try:
        yield f"sqlite:///{Path(directory) / 'taskray.db'}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def database(backend: str, admin_url: str = DEFAULT_ADMIN_URL) -> Iterator[str]:
    if backend == "postgresql":
        with postgres_database(admin_url) as url:
            yield url
    elif backend == "sqlite":
        with sqlite_database() as url:
            yield url
    else:
        raise ValueError(f"unknown backend {backend!r}")


# -- the scheduler on a driver thread ---------------------------------------------------------


class SchedulerThread:
    """Runs ``scheduler.run()`` on a thread of the driver; re-raises what killed it."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-scheduler", daemon=True)

    def _run(self) -> None:
        try:
            self.scheduler.run()
        except BaseException as exc:  # reported to the main thread by check()
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError("the scheduler thread died") from self.error
        if not self.thread.is_alive():
            raise RuntimeError("the scheduler thread stopped")

    def __enter__(self) -> SchedulerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.scheduler.stop()
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            raise RuntimeError("the scheduler thread did not stop within 30 s")
        self.scheduler.resign()
        if self.error is not None and exc[0] is None:
            raise RuntimeError("the scheduler thread died") from self.error


# -- Ray processes ----------------------------------------------------------------------------


def ray_processes(ray_tmpdir: str) -> list[psutil.Process]:
    """This process's descendants, and any process naming our own Ray temp directory."""
    found = {p.pid: p for p in psutil.Process().children(recursive=True)}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or ())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if ray_tmpdir in cmdline:
            found.setdefault(proc.pid, proc)
    return list(found.values())


def ensure_ray_gone(before_shutdown: Sequence[psutil.Process], ray_tmpdir: str) -> list[int]:
    """After ``ray.shutdown()``: wait for the Ray processes we started to exit, then kill,
    by pid, any still there. Returns the pids that had to be killed."""
    candidates = {p.pid: p for p in before_shutdown}
    for proc in ray_processes(ray_tmpdir):
        candidates.setdefault(proc.pid, proc)
    _, alive = psutil.wait_procs(list(candidates.values()), timeout=20)
    killed = []
    for proc in alive:
        try:
            proc.kill()
            killed.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return killed


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


# -- profiling the scheduler loop without touching its code -----------------------------------


class LoopProfiler:
    """Times calls the scheduler loop makes, by wrapping attributes of the objects it uses
    (its store, itself, the ``cluster`` adapter module) for the length of a ``with`` block.

    Also keeps, for each ``cluster.read_nodes`` call, how many CPUs and GPUs the scheduler's
    own ledger says are free and how many Ray's lagging view lets it use (the lesser wins).
    """

    STORE_CALLS = (
        "acquire_leadership",
        "now",
        "live_tasks",
        "reap",
        "candidates",
        "lease",
        "next_scheduled_at",
        "get_many",
    )

    def __init__(self, keep_plans: bool = False) -> None:
        self.keep_plans = keep_plans
        #: With ``keep_plans``: (time.time(), PlacementRequest, PlacementPlan) of each call.
        self.plans: list[tuple[float, Any, Any]] = []
        self.calls: dict[str, list[float]] = {}
        #: Statements, pool checkouts (each one a pre-ping round trip) and commits the
        #: scheduler's own store sent to the database.
        self.db = {"statements": 0, "checkouts": 0, "commits": 0}
        self._listeners: list[tuple[Any, str, Any]] = []
        self.free_views: list[tuple[float, dict[str, float], dict[str, float]]] = []
        self._undo: list[tuple[Any, str, Any, bool]] = []
        self._lock = threading.Lock()
        self.started = time.perf_counter()

    def reset(self) -> None:
        with self._lock:
            self.db = dict.fromkeys(self.db, 0)
            self.calls = {}
            self.free_views = []
            self.plans = []
            self.started = time.perf_counter()

    def _record(self, label: str, seconds: float) -> None:
        with self._lock:
            self.calls.setdefault(label, []).append(seconds)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        had_own = name in vars(owner) if hasattr(owner, "__dict__") else False

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._record(label, time.perf_counter() - t0)

        setattr(owner, name, timed)
        self._undo.append((owner, name, original, had_own))

    def instrument(self, scheduler: Any) -> LoopProfiler:
        from taskray.scheduler import cluster

        for name in self.STORE_CALLS:
            self.wrap(scheduler.store, name, f"store.{name}")
        for event, key in (
            ("before_cursor_execute", "statements"),
            ("checkout", "checkouts"),
            ("commit", "commits"),
        ):

            def count(*_: Any, key: str = key) -> None:
                with self._lock:
                    self.db[key] += 1

            sa.event.listen(scheduler.store.engine, event, count)
            self._listeners.append((scheduler.store.engine, event, count))
        self.wrap(scheduler, "tick", "tick (whole pass)")
        self.wrap(scheduler, "_collect_finished", "collect_finished (incl. ray.wait)")
        self.wrap(scheduler, "placer", "policy place()")
        if self.keep_plans:
            timed_placer = scheduler.placer

            def placer(request: Any) -> Any:
                plan = timed_placer(request)
                with self._lock:
                    self.plans.append((time.time(), request, plan))
                return plan

            scheduler.placer = placer
        self.wrap(cluster, "dispatch", "cluster.dispatch (per task)")
        original_read = cluster.read_nodes
        profiler = self

        def read_nodes(used: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            views = original_read(used, *args, **kwargs)
            profiler._record("cluster.read_nodes", time.perf_counter() - t0)
            ledger: dict[str, float] = {}
            usable: dict[str, float] = {}
            for view in views:
                leased_here = used.get(view.node_id, {})
                for resource in ("CPU", "GPU"):
                    by_ledger = view.total.get(resource, 0.0) - leased_here.get(resource, 0.0)
                    ledger[resource] = ledger.get(resource, 0.0) + max(0.0, by_ledger)
                    usable[resource] = usable.get(resource, 0.0) + view.free.get(resource, 0.0)
            with profiler._lock:
                profiler.free_views.append((time.time(), ledger, usable))
            return views

        self._undo.append((cluster, "read_nodes", original_read, True))
        cluster.read_nodes = read_nodes
        original_listener = scheduler.store.listener

        def listener(*args: Any, **kwargs: Any) -> Any:
            made = original_listener(*args, **kwargs)
            self.wrap(made, "wait", "listener.wait")
            return made

        scheduler.store.listener = listener
        self._undo.append((scheduler.store, "listener", original_listener, False))
        return self

    def restore(self) -> None:
        for target, event, listener in self._listeners:
            sa.event.remove(target, event, listener)
        self._listeners.clear()
        for owner, name, original, had_own in reversed(self._undo):
            if had_own or not hasattr(owner, "__dict__"):
                setattr(owner, name, original)
            else:
                try:
                    delattr(owner, name)
                except AttributeError:
                    setattr(owner, name, original)
        self._undo.clear()

    def report(self, title: str) -> str:
        with self._lock:
            wall = time.perf_counter() - self.started
            calls = {k: list(v) for k, v in self.calls.items()}
            views = list(self.free_views)
            db = dict(self.db)
        rows = []
        for label, values in sorted(calls.items(), key=lambda kv: -sum(kv[1])):
            ms = [v * 1e3 for v in values]
            rows.append(
                [
                    label,
                    len(values),
                    fmt(sum(values), 2),
                    f"{100 * sum(values) / wall:.0f}%",
                    fmt(mean(ms), 2),
                    fmt(percentile(ms, 50), 2),
                    fmt(percentile(ms, 99), 2),
                ]
            )
        lines = [
            f"{title} ({wall:.1f}s of wall clock; nested calls are inside 'tick')",
            table(["call", "n", "total s", "of wall", "mean ms", "p50 ms", "p99 ms"], rows),
        ]
        ticks = len(calls.get("tick (whole pass)", ())) or 1
        lines.append(
            f"scheduler's database work: {db['statements']} statements, {db['checkouts']} "
            f"pool checkouts (each a pre-ping round trip), {db['commits']} commits; per pass "
            f"{db['statements'] / ticks:.1f} / {db['checkouts'] / ticks:.1f} / "
            f"{db['commits'] / ticks:.1f}"
        )
        lagged = {
            r: sum(1 for _, ledger, usable in views if usable.get(r, 0.0) + 1e-9 < ledger[r])
            for r in ("CPU", "GPU")
        }
        if views:
            lines.append(
                f"read_nodes calls where Ray's view allowed less than the ledger: "
                f"CPU {lagged['CPU']}/{len(views)}, GPU {lagged['GPU']}/{len(views)}"
            )
        return "\n".join(lines)


# -- cold starts: no worker process of an earlier run left -----------------------------------

#: Titles of Ray's per-node helper processes: not worker processes.
_RAY_HELPERS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def ray_worker_processes() -> list[psutil.Process]:
    """Ray worker processes among this process's descendants (a cluster it started):
    idle ones (``ray::IDLE``), ones running a task or an actor, and ones still starting."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        title = " ".join(cmdline)
        if not cmdline or title.startswith(_RAY_HELPERS):
            continue
        # A worker still starting runs default_worker.py as its script (a raylet only
        # names it among its arguments); a started one has retitled itself "ray::...".
        starting = len(cmdline) > 1 and cmdline[1].endswith("default_worker.py")
        if title.startswith("ray::") or starting:
            found.append(proc)
    return found


def wait_for_no_workers(timeout_s: float = 30.0) -> int:
    """Wait until no Ray worker process of ours is left (the job that used them ended), so
    the next run starts as cold as a new user's would; returns how many are still there
    after ``timeout_s`` (0: none)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = ray_worker_processes()
        if not left or time.monotonic() > deadline:
            return len(left)
        time.sleep(0.2)  # Ray ends a finished job's workers asynchronously
