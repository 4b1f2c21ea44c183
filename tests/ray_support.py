"""Starting Ray for the tests: one local Ray or one fake multi-node cluster at a time.

Everything stays on loopback, Ray's files go to a temporary directory, and the
auth token is a random one of the test run's (nothing lands in the home directory).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from taskray.scheduler.core import Scheduler, SchedulerConfig
from taskray.store import Store

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def _ray_environment() -> None:
    # The rest of Ray's environment is set in conftest.py, before Ray is imported.
    # Workers import the test handlers as tests.handlers.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p
    )


RUNTIME_ENV = {"env_vars": {"PYTHONPATH": REPO_ROOT}}


@contextmanager
def local_ray(
    num_cpus: int = 4, num_gpus: int = 0, dashboard_port: int | None = None
) -> Iterator[None]:
    """A local Ray; with ``dashboard_port``, its dashboard too (Ray's state API, which
    ``ray.util.state`` reads, is served by the dashboard), on loopback."""
    _ray_environment()
    dashboard: dict[str, Any] = (
        {"include_dashboard": False}
        if dashboard_port is None
        else {
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
        }
    )
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        runtime_env=RUNTIME_ENV,
        logging_level="WARNING",
        **dashboard,
    )
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def multi_node_cluster(nodes: list[dict[str, Any]]) -> Iterator[Cluster]:
    """A head that runs nothing, plus ``nodes`` (``Cluster.add_node`` arguments)."""
    _ray_environment()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        for node in nodes:
            cluster.add_node(**node)
        ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, logging_level="WARNING")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def wait_for(
    condition: Callable[[], Any], timeout_s: float = 60.0, interval_s: float = 0.05
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)


@contextmanager
def running_scheduler(
    store: Store, database_url: str, config: SchedulerConfig | None = None
) -> Iterator[Scheduler]:
    """The scheduler loop on a thread of the test process (the actor runs the same loop)."""
    scheduler = Scheduler(store, database_url, config or SchedulerConfig(reap_interval_s=1.0))
    thread = threading.Thread(target=scheduler.run, name="test-scheduler", daemon=True)
    thread.start()
    try:
        yield scheduler
    finally:
        scheduler.stop()
        thread.join(timeout=30)
        scheduler.resign()
