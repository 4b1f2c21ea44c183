"""Task handlers the benchmarks run on Ray workers (imported there as ``bench.handlers``).

The benchmarks put the repository root on the workers' ``PYTHONPATH`` through the
job's ``runtime_env``, so ``bench.handlers:noop`` resolves as a taskray task type.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def noop() -> None:
    return None


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
    imports the executor and opens its per-process store, as a long-running one would have.
    Returns the worker's pid."""
    if database_url is not None:
        from taskray.executor import store_for

        store_for(database_url)
    Path(directory, f"{group}-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(Path(directory).glob(f"{group}-*"))) < size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"warm-up group {group}: fewer than {size} workers came up")
        time.sleep(0.02)  # waiting on the condition above, with a deadline
    return os.getpid()


def timed_sleep_on_node(seconds: float) -> dict[str, float | int | str]:
    """``timed_sleep`` for a plain Ray task: also says which node it ran on."""
    import ray

    out: dict[str, float | int | str] = dict(timed_sleep(seconds))
    out["node"] = ray.get_runtime_context().get_node_id()
    return out
