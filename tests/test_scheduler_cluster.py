"""The scheduler on a multi-node Ray cluster (fake nodes on this machine) with PostgreSQL.

Nodes: a head that runs nothing, two CPU nodes and one node declaring 2 GPUs.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from taskray.models import AttemptOutcome, Resources, Task, TaskState
from taskray.scheduler.actor import start_scheduler, stop_scheduler
from taskray.scheduler.core import SchedulerConfig
from taskray.store import Store
from taskray.testing import make_spec
from tests.ray_support import multi_node_cluster, running_scheduler, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

GIB = 1 << 30
CPU_NODE = {"num_cpus": 4, "memory": 4 * GIB, "resources": {"cpu_node": 1}}
GPU_NODE = {"num_cpus": 4, "num_gpus": 2, "memory": 8 * GIB, "resources": {"gpu_node": 1}}


@pytest.fixture(scope="module")
def cluster(postgres: Any) -> Iterator[Cluster]:
    # Detect a removed node within ~2 s instead of Ray's default ~30 s.
    os.environ["RAY_health_check_period_ms"] = "500"  # noqa: SIM112
    os.environ["RAY_health_check_timeout_ms"] = "500"  # noqa: SIM112
    os.environ["RAY_health_check_failure_threshold"] = "3"  # noqa: SIM112
    with multi_node_cluster([CPU_NODE, CPU_NODE, GPU_NODE]) as started:
        yield started


@pytest.fixture
def pg(cluster: Cluster, database_url: str) -> Iterator[tuple[Store, str]]:
    store = Store.open(database_url, migrate=False)
    yield store, database_url
    store.close()


@pytest.fixture
def backend() -> str:
    return "postgresql"


def node_ids(resource: str) -> set[str]:
    return {
        n["NodeID"]
        for n in ray.nodes()  # type: ignore[no-untyped-call]
        if n["Alive"] and resource in n["Resources"]
    }


def run_all(store: Store, url: str, ids: list[uuid.UUID], **config: Any) -> list[Task]:
    with running_scheduler(store, url, SchedulerConfig(reap_interval_s=0.5, **config)):
        wait_for(lambda: all(t.status.is_terminal for t in store.get_many(ids)), timeout_s=120)
    return store.get_many(ids)


def peak_usage(store: Store, tasks: list[Task]) -> dict[str, dict[str, float]]:
    """The most of each resource any node had in use at once, from recorded start/end times."""
    events: dict[str, list[tuple[datetime, int, dict[str, float]]]] = defaultdict(list)
    for task in tasks:
        for attempt in store.attempts(task.id):
            if attempt.started_at is None:
                continue  # leased but never started (its lease ran out first): it never ran
            assert attempt.node_id and attempt.finished_at
            demand = task.resources.as_dict()
            # Ends sort before starts at the same instant: a slot freed and taken at once.
            events[attempt.node_id].append((attempt.started_at, 1, demand))
            events[attempt.node_id].append((attempt.finished_at, 0, demand))
    peaks: dict[str, dict[str, float]] = {}
    for node, node_events in events.items():
        in_use: dict[str, float] = defaultdict(float)
        peak: dict[str, float] = defaultdict(float)
        for _when, starting, demand in sorted(node_events, key=lambda e: (e[0], e[1])):
            for name, amount in demand.items():
                in_use[name] += amount if starting else -amount
                peak[name] = max(peak[name], in_use[name])
        peaks[node] = dict(peak)
    return peaks


def totals_by_node() -> dict[str, dict[str, float]]:
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}  # type: ignore[no-untyped-call]


def test_gpu_tasks_run_only_on_the_gpu_node_and_no_node_is_overcommitted(
    pg: tuple[Store, str],
) -> None:
    store, url = pg
    specs = [
        make_spec(
            "tests.handlers:sleep",
            payload={"args": [0.4, f"gpu-{i}"]},
            resources=Resources(num_cpus=1, num_gpus=1),
        )
        for i in range(5)
    ] + [
        make_spec(
            "tests.handlers:sleep",
            payload={"args": [0.4, f"cpu-{i}"]},
            resources=Resources(num_cpus=1, memory=GIB),
        )
        for i in range(14)
    ]
    tasks = run_all(store, url, [r.task.id for r in store.submit_many(specs)])
    assert all(t.status is TaskState.SUCCEEDED for t in tasks)
    gpu_nodes = node_ids("gpu_node")
    for task in tasks:
        if task.resources.num_gpus:
            assert task.node_id in gpu_nodes
            assert task.result["gpus"] in ("0", "1")  # Ray gave it one of the two GPUs
    totals = totals_by_node()
    for node, peak in peak_usage(store, tasks).items():
        for name, amount in peak.items():
            assert amount <= totals[node].get(name, 0.0) + 1e-9, (node, name, amount)


def test_cpu_tasks_use_the_gpu_node_only_when_no_gpu_task_would_wait(
    pg: tuple[Store, str],
) -> None:
    store, url = pg
    gpu_nodes = node_ids("gpu_node")
    # 8 CPU tasks fill both CPU nodes; 2 more would fit only on the GPU node, where
    # 2 waiting GPU tasks need all 4 of its CPUs: the extra CPU tasks must not go there.
    cpu = [
        make_spec("tests.handlers:sleep", payload={"args": [1.5]}, priority=5, key=f"c{i}")
        for i in range(10)
    ]
    gpu = [
        make_spec(
            "tests.handlers:sleep",
            payload={"args": [1.5]},
            priority=1,
            resources=Resources(num_cpus=2, num_gpus=1),
            key=f"g{i}",
        )
        for i in range(2)
    ]
    results = store.submit_many(cpu + gpu)
    tasks = run_all(store, url, [r.task.id for r in results])
    cpu_tasks, gpu_tasks = tasks[:10], tasks[10:]
    first_finish = min(t.completed_at for t in tasks if t.completed_at)
    for task in gpu_tasks:
        assert task.node_id in gpu_nodes
        assert task.started_at is not None
        # They did not wait for anything to finish first.
        assert task.leased_at is not None and task.leased_at < first_finish
    # When each ran, by its attempt (a task's completed_at is when its result committed,
    # which an executor hands off after the task has ended).
    ran = {t.id: store.attempts(t.id)[-1] for t in tasks}
    overlap = [
        t
        for t in cpu_tasks
        if t.node_id in gpu_nodes
        and any(
            ran[t.id].started_at < ran[g.id].finished_at  # type: ignore[operator]
            and ran[g.id].started_at < ran[t.id].finished_at  # type: ignore[operator]
            for g in gpu_tasks
        )
    ]
    assert overlap == [], "a CPU task took the GPU node's CPUs while GPU tasks needed them"

    # With no GPU task waiting, CPU tasks that find the CPU nodes full do use the GPU node.
    more = store.submit_many(
        [make_spec("tests.handlers:sleep", payload={"args": [1.5]}) for _ in range(11)]
    )
    extra = run_all(store, url, [r.task.id for r in more])
    assert any(t.node_id in gpu_nodes for t in extra)
    on_gpu = [t for t in extra if t.node_id in gpu_nodes]
    first_wave_end = min(t.completed_at for t in extra if t.completed_at)
    assert any(t.leased_at and t.leased_at < first_wave_end for t in on_gpu)


def test_higher_priority_starts_first_under_contention(pg: tuple[Store, str]) -> None:
    store, url = pg
    low = [
        make_spec("tests.handlers:sleep", payload={"args": [0.5]}, priority=0) for _ in range(20)
    ]
    high = [
        make_spec("tests.handlers:sleep", payload={"args": [0.5]}, priority=10) for _ in range(6)
    ]
    results = store.submit_many(low + high)  # low first: order of arrival must not matter
    tasks = run_all(store, url, [r.task.id for r in results])
    low_tasks, high_tasks = tasks[:20], tasks[20:]
    latest_high = max(t.leased_at for t in high_tasks if t.leased_at)
    earliest_low = min(t.leased_at for t in low_tasks if t.leased_at)
    assert latest_high <= earliest_low


def test_connections_grow_with_nodes_not_with_worker_processes(pg: tuple[Store, str]) -> None:
    """Executors reach the store through their node's agent: no worker process opens a
    connection, and each node's agent holds a bounded pool whatever runs there."""
    store, url = pg
    specs = [make_spec("tests.handlers:connections_here") for _ in range(40)] + [
        make_spec("tests.handlers:sleep", payload={"args": [0.3]}) for _ in range(24)
    ]
    ids = [r.task.id for r in store.submit_many(specs)]
    seen: list[int] = []

    def agent_connections() -> int:
        with store.transaction() as (connection, _):
            return int(
                connection.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() "
                    "AND application_name = 'taskray-node-agent'"
                ).scalar_one()
            )

    def done() -> bool:
        seen.append(agent_connections())
        return all(t.status.is_terminal for t in store.get_many(ids))

    with running_scheduler(store, url, SchedulerConfig(reap_interval_s=0.5)):
        wait_for(done, timeout_s=120)
    tasks = store.get_many(ids)
    assert all(t.status is TaskState.SUCCEEDED for t in tasks)
    reports = [t.result for t in tasks if t.type.endswith("connections_here")]
    assert reports and not any(report["driver"] for report in reports)
    workers = {t.result["pid"] for t in tasks}
    nodes = {t.node_id for t in tasks}
    assert max(seen) > 0
    assert max(seen) <= 8 * len(nodes)
    # More worker processes ran tasks than a pool per process would allow for.
    assert len(workers) >= len(nodes)


def test_a_removed_node_s_task_runs_again_elsewhere_and_commits_once(
    pg: tuple[Store, str], cluster: Cluster, tmp_path: Path
) -> None:
    store, url = pg
    fragile = [cluster.add_node(num_cpus=1, resources={"fragile": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    calls = tmp_path / "calls"
    task = store.submit(
        make_spec(
            "tests.handlers:count_and_sleep",
            payload={"args": [str(calls), 3]},
            resources=Resources(num_cpus=1, custom={"fragile": 1}),
            max_retries=5,
            backoff_base_s=0.2,
        )
    ).task
    config = SchedulerConfig(lease_ttl_s=4, heartbeat_interval_s=1, reap_interval_s=0.5)
    try:
        with running_scheduler(store, url, config):
            # The handler itself has begun (RUNNING is committed just before it starts).
            wait_for(lambda: calls.exists() and calls.read_text().strip(), timeout_s=60)
            running = store.get(task.id)
            assert running.status is TaskState.RUNNING
            victim = next(n for n in fragile if n.node_id == running.node_id)
            cluster.remove_node(victim, allow_graceful=False)
            wait_for(lambda: store.get(task.id).status.is_terminal, timeout_s=90)
    finally:
        for node in fragile:
            if node.node_id != running.node_id:
                cluster.remove_node(node)
    done = store.get(task.id)
    assert done.status is TaskState.SUCCEEDED
    assert done.node_id != running.node_id
    attempts = store.attempts(task.id)
    assert [a.outcome for a in attempts].count(AttemptOutcome.SUCCEEDED) == 1
    assert attempts[0].node_id == running.node_id and attempts[0].outcome in (
        AttemptOutcome.FAILED,
        AttemptOutcome.LEASE_EXPIRED,
    )
    executions = calls.read_text().splitlines()
    assert len(executions) >= 2  # it ran again
    assert done.result == len(executions)  # and the committed result is the last run's


def test_the_scheduler_actor_is_named_detached_and_restarted(pg: tuple[Store, str]) -> None:
    store, url = pg
    handle = start_scheduler(url, SchedulerConfig(reap_interval_s=0.5))
    try:
        assert ray.get_actor("taskray-scheduler", namespace="taskray") is not None
        first = store.submit(make_spec("tests.handlers:add", payload={"args": [2, 3]})).task
        wait_for(lambda: store.get(first.id).status is TaskState.SUCCEEDED, timeout_s=60)
        epoch = ray.get(handle.status.remote())["epoch"]
        assert epoch is not None
        ray.kill(handle, no_restart=False)  # Ray restarts it
        second = store.submit(make_spec("tests.handlers:add", payload={"args": [4, 5]})).task
        wait_for(lambda: store.get(second.id).status is TaskState.SUCCEEDED, timeout_s=90)
        assert store.get(second.id).result == 9
        restarted = wait_for(lambda: ray.get(handle.status.remote(), timeout=10), timeout_s=60)
        assert restarted["epoch"] > epoch  # the new incarnation fenced the old one
    finally:
        assert stop_scheduler()
    assert store.leadership() is None


def test_the_scheduler_starts_worker_processes_on_every_node_before_it_is_ready(
    pg: tuple[Store, str], cluster: Cluster
) -> None:
    """A worker process takes seconds to start, and Ray keeps GPU and CPU ones apart: the
    first tasks of each kind on a node must find one already running. (A node of its own,
    which no earlier test's tasks ran on.)"""
    store, url = pg
    node = cluster.add_node(num_cpus=2, num_gpus=1, resources={"new_node": 2})
    cluster.wait_for_nodes()
    handle = start_scheduler(url, SchedulerConfig(reap_interval_s=0.5))
    try:
        submitted_at = time.time()
        specs = [
            make_spec(
                "tests.handlers:worker_born",
                resources=Resources(num_cpus=1, num_gpus=1, custom={"new_node": 1}),
            ),
            make_spec(
                "tests.handlers:worker_born",
                resources=Resources(num_cpus=1, custom={"new_node": 1}),
            ),
        ]
        ids = [store.submit(spec).task.id for spec in specs]
        wait_for(lambda: all(t.status.is_terminal for t in store.get_many(ids)), timeout_s=60)
        tasks = store.get_many(ids)
        assert [t.status for t in tasks] == [TaskState.SUCCEEDED] * 2
        for task in tasks:
            assert task.result["born"] < submitted_at, task
        assert ray.get(handle.warmed.remote(0.0))
    finally:
        assert stop_scheduler()
        cluster.remove_node(node)


def test_the_sdk_joins_a_cluster_and_refuses_sqlite_there(
    pg: tuple[Store, str], cluster: Cluster, tmp_path: Path
) -> None:
    import taskray
    from tests import sdk_functions as fns

    with pytest.raises(taskray.InvalidTaskError, match="PostgreSQL"):
        taskray.init(f"sqlite:///{tmp_path / 'one-machine.db'}", ray_address=cluster.address)
    assert not taskray.is_initialized()
    _store, url = pg
    try:
        taskray.init(url, ray_address=cluster.address)
        handle = fns.which_gpu.submit()
        assert taskray.get(handle, timeout=90) in ("0", "1")
        assert handle.task().node_id in node_ids("gpu_node")
    finally:
        taskray.shutdown()
        stop_scheduler()  # the SDK leaves a cluster's shared scheduler running
    assert ray.is_initialized()  # and it did not stop a Ray it did not start
