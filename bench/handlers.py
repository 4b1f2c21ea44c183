"""Task handlers the benchmarks run on Ray workers (imported there as ``bench.handlers``)
and on Celery workers (registered by ``bench.celery_app``).

The benchmarks put the repository root on the workers' ``PYTHONPATH`` through the
job's ``runtime_env``, so ``bench.handlers:noop`` resolves as a taskray task type.
Plain functions (``@handler`` only marks them as taskray task types, for the deployment's
task modules): each system wraps them its own way (``@ray.remote``, ``taskray.task``,
``app.task``), so all run the same code.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from taskray.registry import handler


@handler
def noop(item: object = None) -> None:
    """Does nothing; takes one optional argument so that ``f.map(range(n))`` can call it."""
    return None


@handler
def started_at(item: object = None) -> float:
    """Returns this host's clock when the task started (pickup latency)."""
    return time.time()


@handler
def sleep_ms(ms: float = 10.0) -> None:
    """Sleeps ``ms`` milliseconds (short tasks: how busy the CPUs are kept)."""
    time.sleep(ms / 1000.0)


@handler
def worker_pid(item: object = None) -> int:
    """The pid of the process that runs the task (to profile one worker)."""
    return os.getpid()


@handler
def taskray_file(item: object = None) -> str:
    """Where the worker imported taskray from (the bench checks it runs the code it means)."""
    import taskray

    return str(taskray.__file__)


@handler
def timed_sleep(seconds: float) -> dict[str, float | int]:
    """Sleeps ``seconds`` and says when it ran (this host's clock) and in which process."""
    start = time.time()
    time.sleep(seconds)
    return {"start": start, "end": time.time(), "pid": os.getpid()}


def barrier(
    directory: str, group: str, size: int, timeout_s: float, database_url: str | None = None
) -> int:
    """Holds its worker until ``size`` tasks of ``group`` run at once, so Ray must start
    ``size`` distinct worker processes (the warm-up). With ``database_url`` the worker also
    imports the executor, as a long-running one would have (executors open no store: they
    reach it through their node's agent). Returns the worker's pid."""
    if database_url is not None:
        import taskray.executor  # noqa: F401
    Path(directory, f"{group}-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(Path(directory).glob(f"{group}-*"))) < size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"warm-up group {group}: fewer than {size} workers came up")
        time.sleep(0.02)  # waiting on the condition above, with a deadline
    return os.getpid()


@handler
def timed_sleep_on_node(seconds: float) -> dict[str, float | int | str]:
    """``timed_sleep`` for a plain Ray task: also says which node it ran on."""
    import ray

    out: dict[str, float | int | str] = dict(timed_sleep(seconds))
    out["node"] = ray.get_runtime_context().get_node_id()
    return out


@handler
def traced_sleep(seconds: float) -> dict[str, float | int | str]:
    """``timed_sleep`` that also says on which Ray node it ran and when its worker process
    was created (``born``, this host's clock), so a bench can split a task's wait into
    waiting for a worker process, that process starting, and the task itself. Runs the same
    under plain Ray and under taskray's executor (both run it in a Ray worker)."""
    import psutil
    import ray

    out: dict[str, float | int | str] = dict(timed_sleep(seconds))
    out["node"] = ray.get_runtime_context().get_node_id()
    out["born"] = psutil.Process().create_time()
    return out
