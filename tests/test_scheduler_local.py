"""The scheduler and executor on a single-node Ray with the embedded SQLite store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from taskray.models import AttemptOutcome, Resources, TaskState
from taskray.store import Store
from taskray.testing import make_spec
from tests.ray_support import local_ray, running_scheduler, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    with local_ray(num_cpus=4):
        yield


@pytest.fixture
def sqlite_store(tmp_path: Path, ray_local: None) -> Iterator[tuple[Store, str]]:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    store = Store.open(url)
    yield store, url
    store.close()


def finished(store: Store, ids: list) -> bool:  # type: ignore[type-arg]
    return all(t.status.is_terminal for t in store.get_many(ids))


def test_tasks_run_and_commit_their_results(sqlite_store: tuple[Store, str]) -> None:
    store, url = sqlite_store
    with running_scheduler(store, url):
        ids = [
            r.task.id
            for r in store.submit_many(
                [make_spec("tests.handlers:add", payload={"args": [i, 10]}) for i in range(12)]
            )
        ]
        wait_for(lambda: finished(store, ids))
    tasks = store.get_many(ids)
    assert [t.result for t in tasks] == [i + 10 for i in range(12)]
    assert all(t.status is TaskState.SUCCEEDED and t.node_id for t in tasks)
    for task in tasks:
        [attempt] = store.attempts(task.id)
        assert attempt.outcome is AttemptOutcome.SUCCEEDED
        assert attempt.worker_id and attempt.started_at and attempt.finished_at


def test_a_dag_runs_in_dependency_order(sqlite_store: tuple[Store, str]) -> None:
    store, url = sqlite_store
    results = store.submit_many(
        [
            make_spec("tests.handlers:add", payload={"args": [1, 2]}, key="a"),
            make_spec("tests.handlers:add", payload={"args": [3, 4]}, key="b"),
            make_spec(
                "tests.handlers:add", payload={"args": [0, 0]}, key="c", depends_on=["a", "b"]
            ),
        ]
    )
    with running_scheduler(store, url):
        wait_for(lambda: finished(store, [r.task.id for r in results]))
    a, b, c = store.get_many([r.task.id for r in results])
    assert c.status is TaskState.SUCCEEDED
    assert c.started_at is not None and a.completed_at is not None and b.completed_at is not None
    assert c.started_at >= max(a.completed_at, b.completed_at)


def test_flaky_handler_succeeds_after_backoff(
    sqlite_store: tuple[Store, str], tmp_path: Path
) -> None:
    store, url = sqlite_store
    spec = make_spec(
        "tests.handlers:flaky",
        payload={"args": [str(tmp_path / "calls"), 2]},
        max_retries=3,
        backoff_base_s=0.5,
        jitter=0.0,
    )
    task = store.submit(spec).task
    with running_scheduler(store, url):
        wait_for(lambda: finished(store, [task.id]))
    done = store.get(task.id)
    assert done.status is TaskState.SUCCEEDED and done.result == "succeeded on call 3"
    attempts = store.attempts(task.id)
    assert [a.outcome for a in attempts] == [
        AttemptOutcome.FAILED,
        AttemptOutcome.FAILED,
        AttemptOutcome.SUCCEEDED,
    ]
    assert "ConnectionError: transient failure 1" in (attempts[0].error or "")
    # Exponential backoff between attempts: 0.5 s, then 1 s (no jitter).
    for previous, following, backoff in zip(attempts, attempts[1:], (0.5, 1.0), strict=False):
        assert previous.finished_at is not None
        assert following.leased_at - previous.finished_at >= timedelta(seconds=backoff)


def test_failures_dead_letter_with_tracebacks(sqlite_store: tuple[Store, str]) -> None:
    store, url = sqlite_store
    always = store.submit(
        make_spec("tests.handlers:always_fails", max_retries=2, backoff_base_s=0.1)
    ).task
    poison = store.submit(make_spec("tests.handlers:poison", max_retries=5)).task
    unknown = store.submit(make_spec("tests.handlers:no_such_function", max_retries=5)).task
    with running_scheduler(store, url):
        wait_for(lambda: finished(store, [always.id, poison.id, unknown.id]))
    assert store.get(always.id).status is TaskState.DEAD
    attempts = store.attempts(always.id)
    assert len(attempts) == 3
    for attempt in attempts:
        assert attempt.outcome is AttemptOutcome.FAILED
        assert (
            attempt.traceback
            and "ValueError: this input can never be processed" in attempt.traceback
        )
        assert "always_fails" in attempt.traceback
    # A non-retryable error, and a type that cannot be loaded, go dead on the first attempt.
    for task_id in (poison.id, unknown.id):
        assert store.get(task_id).status is TaskState.DEAD
        assert len(store.attempts(task_id)) == 1
    assert {t.id for t in store.list_dead()} == {always.id, poison.id, unknown.id}


def test_a_task_past_its_timeout_is_killed_and_retried(
    sqlite_store: tuple[Store, str], tmp_path: Path
) -> None:
    store, url = sqlite_store
    pid_file = tmp_path / "pid"
    task = store.submit(
        make_spec(
            "tests.handlers:record_pid_and_sleep",
            payload={"args": [str(pid_file), 60]},
            timeout_s=1.5,
            max_retries=1,
            backoff_base_s=0.1,
        )
    ).task
    with running_scheduler(store, url):
        first_pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text()))
        wait_for(lambda: finished(store, [task.id]), timeout_s=60)
    dead = store.get(task.id)
    assert dead.status is TaskState.DEAD
    attempts = store.attempts(task.id)
    assert len(attempts) == 2
    assert all("timed out after 1.5s" in (a.error or "") for a in attempts)
    for attempt in attempts:
        assert attempt.started_at and attempt.finished_at
        assert attempt.finished_at - attempt.started_at < timedelta(seconds=30)

    # The worker that ran the first attempt was killed, not left sleeping.
    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(lambda: gone(first_pid), timeout_s=30)


def test_delayed_task_does_not_start_before_its_time(sqlite_store: tuple[Store, str]) -> None:
    store, url = sqlite_store
    with running_scheduler(store, url):
        task = store.submit(
            make_spec("tests.handlers:add", payload={"args": [1, 1]}, delay_s=2)
        ).task
        wait_for(lambda: finished(store, [task.id]))
    done = store.get(task.id)
    assert done.started_at is not None and done.started_at >= task.created_at + timedelta(seconds=2)


def test_a_task_no_node_can_hold_waits_and_is_reported(sqlite_store: tuple[Store, str]) -> None:
    store, url = sqlite_store
    huge = store.submit(make_spec("tests.handlers:add", resources=Resources(num_cpus=64))).task
    with running_scheduler(store, url) as scheduler:
        wait_for(lambda: huge.id in scheduler.last_report.infeasible)
    assert store.get(huge.id).status is TaskState.QUEUED
