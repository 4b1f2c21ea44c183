"""Task handlers the scheduler tests run on Ray workers (imported there as tests.handlers).

The test session names this module in TASKRAY_TASK_MODULES (conftest.py), so each function
marked ``@handler`` runs as ``tests.handlers:<name>``; an unmarked one would be refused.
``handler`` only marks: workers import neither the SDK nor the store for it."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from taskray.executor import NonRetryableError
from taskray.registry import handler


@handler
def add(a: int, b: int) -> int:
    return a + b


@handler
def noop(*args: object, **kwargs: object) -> None:
    """Takes anything, does nothing: a registered type for tests that never run it."""


@handler
def echo(*args: object, **kwargs: object) -> dict[str, object]:
    """Its arguments back as they arrived, with the Python type of each keyword argument
    (a value that was unpickled on the way would show its own type)."""
    return {
        "args": list(args),
        "kwargs": kwargs,
        "kinds": {name: type(value).__name__ for name, value in kwargs.items()},
    }


@handler
def sleep(seconds: float, tag: str = "") -> dict[str, object]:
    time.sleep(seconds)
    return {"tag": tag, "pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _count_call(path: str) -> int:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        handle.seek(0)
        return len(handle.read().splitlines())


@handler
def flaky(path: str, failures: int) -> str:
    """Fails on its first ``failures`` calls (counted in a file shared by all workers)."""
    call = _count_call(path)
    if call <= failures:
        raise ConnectionError(f"transient failure {call}")
    return f"succeeded on call {call}"


@handler
def always_fails() -> None:
    raise ValueError("this input can never be processed")


@handler
def poison() -> None:
    raise NonRetryableError("malformed record")


@handler
def record_pid_and_sleep(path: str, seconds: float) -> str:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "finished"


@handler
def count_and_sleep(path: str, seconds: float) -> int:
    """Counts its executions in ``path`` (at-least-once execution is visible), then sleeps."""
    call = _count_call(path)
    time.sleep(seconds)
    return call


@handler
def connections_here() -> dict[str, object]:
    """Whether this executor process has loaded a database driver (it should not: the
    node agent holds the node's connections), and its pid."""
    import sys

    return {"driver": "psycopg" in sys.modules, "pid": os.getpid()}


@handler
def worker_born() -> dict[str, object]:
    """When this worker process was created (this host's clock), and its pid."""
    import psutil

    return {"pid": os.getpid(), "born": psutil.Process().create_time()}
