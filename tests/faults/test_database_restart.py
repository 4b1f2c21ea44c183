"""The scheduler actor and the node agents against PostgreSQL restarting or being down.

Each test runs the real scheduler actor on the suite's Ray, against a database on the
suite's own PostgreSQL cluster, which it restarts (``pg_ctl restart -m fast``: every
connection is cut) or stops. Recovery is timed from the moment the server accepts
connections again to the first completion after it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import sqlalchemy as sa

from taskray.errors import StoreUnavailableError
from taskray.models import AttemptOutcome, Task, TaskState
from taskray.node import with_retries
from taskray.scheduler.actor import start_scheduler, stop_scheduler
from taskray.scheduler.core import SchedulerConfig
from taskray.store import Store
from taskray.store import engine as engines
from taskray.testing import make_spec
from tests.faults.conftest import PrivatePostgres
from tests.faults.handlers import SINK_DDL
from tests.ray_support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

#: The most a recovery may take until work is leased again: the target is under 5 s; test
#: machines are small and shared, so the tests allow twice that and report what they saw.
RECOVERY_DEADLINE_S = 10.0
#: ... and until it is done: a scheduler that starts afresh also waits for Ray to start
#: worker processes for its lanes, seconds each on a small machine.
COMPLETION_DEADLINE_S = 30.0
#: Without notifications a pass would wait this long: a pickup well under it came from
#: LISTEN/NOTIFY, not from the idle poll.
IDLE_WAIT_S = 5.0
CONFIG = SchedulerConfig(idle_wait_s=IDLE_WAIT_S, reap_interval_s=1.0)


@pytest.fixture
def store(fault_url: str, fault_ray: None) -> Iterator[Store]:
    opened = Store.open(fault_url, migrate=False)
    yield opened
    opened.close()


@pytest.fixture
def scheduler_name(pg: PrivatePostgres) -> Iterator[str]:
    """A scheduler actor name of this test's; the actor is stopped at the end (with the
    database up, so that it can give up its leader lease)."""
    name = f"taskray-scheduler-{uuid.uuid4().hex[:8]}"
    yield name
    if not pg.running:
        pg.start()
    stop_scheduler(name)


def status(handle: Any) -> dict[str, Any] | None:
    """The actor's status, or None while it cannot answer (dead, or restarting)."""
    try:
        reply: dict[str, Any] = ray.get(handle.status.remote(), timeout=10)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None
    return reply


def add(store: Store, a: int, b: int) -> Task:
    spec = make_spec("tests.handlers:add", payload={"args": [a, b]})
    return with_retries(lambda: store.submit(spec)).task


def get(store: Store, task_id: uuid.UUID) -> Task:
    # A client's first call after a restart may fail (its pooled connection was cut): the
    # test's calls retry as the project's own clients do.
    return with_retries(lambda: store.get(task_id))


def recovered(store: Store, task: Task, back: float, record_property: Any) -> Task:
    """``task`` once it succeeded; records how long after ``back`` (the server accepting
    connections again) it was leased (within ``RECOVERY_DEADLINE_S``), and done."""
    wait_for(
        lambda: get(store, task.id).status is not TaskState.QUEUED,
        timeout_s=RECOVERY_DEADLINE_S,
        interval_s=0.01,
    )
    leased_s = time.monotonic() - back
    done = succeeded(store, task, timeout_s=COMPLETION_DEADLINE_S)
    done_s = time.monotonic() - back
    record_property("leased_s", round(leased_s, 3))
    record_property("recovery_s", round(done_s, 3))
    print(f"leased {leased_s:.2f} s, done {done_s:.2f} s after the database was back")
    return done


def succeeded(store: Store, task: Task, timeout_s: float) -> Task:
    done: Task = wait_for(
        lambda: (t := get(store, task.id)).status is TaskState.SUCCEEDED and t,
        timeout_s=timeout_s,
        interval_s=0.01,
    )
    return done


def test_the_scheduler_survives_a_database_restart(
    store: Store,
    fault_url: str,
    pg: PrivatePostgres,
    scheduler_name: str,
    record_property: Any,
) -> None:
    handle = start_scheduler(fault_url, CONFIG, name=scheduler_name)
    succeeded(store, add(store, 1, 2), timeout_s=60)
    before = status(handle)
    assert before is not None and before["listener"]["connected"]

    pg.restart()
    back = time.monotonic()
    after = add(store, 2, 3)
    assert recovered(store, after, back, record_property).result == 5

    # LISTEN came back too: new work is picked up on its notification, not on the slow poll.
    wait_for(
        lambda: (
            (s := status(handle)) is not None
            and s["listener"]["connected"]
            and s["listener"]["connects"] > before["listener"]["connects"]
        ),
        timeout_s=RECOVERY_DEADLINE_S,
    )
    for n in range(3):
        submitted = time.monotonic()
        task = add(store, n, n)
        wait_for(lambda t=task: get(store, t.id).status is not TaskState.QUEUED, interval_s=0.005)
        pickup_s = time.monotonic() - submitted
        assert pickup_s < 1.0, f"pickup took {pickup_s:.2f} s: woken by the poll, not NOTIFY"
        succeeded(store, task, timeout_s=30)
    final = status(handle)
    assert final is not None and final["running"]


def test_a_scheduler_started_while_the_database_is_down_waits_for_it(
    store: Store,
    fault_url: str,
    pg: PrivatePostgres,
    scheduler_name: str,
    record_property: Any,
) -> None:
    pg.stop()
    handle = start_scheduler(fault_url, CONFIG, name=scheduler_name)
    waiting = status(handle)
    assert waiting is not None and waiting["running"] and waiting["epoch"] is None

    pg.start()
    back = time.monotonic()
    task = add(store, 20, 22)
    assert recovered(store, task, back, record_property).result == 42


def test_a_scheduler_restarted_while_the_database_is_down_comes_back(
    store: Store,
    fault_url: str,
    pg: PrivatePostgres,
    scheduler_name: str,
    record_property: Any,
) -> None:
    handle = start_scheduler(fault_url, CONFIG, name=scheduler_name)
    succeeded(store, add(store, 1, 1), timeout_s=60)

    pg.stop()
    ray.kill(handle, no_restart=False)  # Ray restarts it, with the database still down
    # Only the new incarnation can be without an epoch: the old one led.
    restarted = wait_for(
        lambda: (s := status(handle)) is not None and s["epoch"] is None and s, timeout_s=30
    )
    assert restarted["running"]
    again = start_scheduler(fault_url, CONFIG, name=scheduler_name)
    assert again._actor_id == handle._actor_id

    pg.start()
    back = time.monotonic()
    task = add(store, 4, 5)
    assert recovered(store, task, back, record_property).result == 9


@ray.remote(num_cpus=0, max_restarts=-1)
class _Doomed:
    """An actor whose restarts fail, slowly: looked up while it restarts, it is returned
    by ``get_if_exists`` and dies a moment later."""

    def __init__(self, marker: str) -> None:
        path = Path(marker)
        if path.exists():
            path.write_text("restarting")
            time.sleep(2.0)
            raise RuntimeError("this incarnation cannot start")
        path.write_text("first")

    def ready(self) -> bool:
        return True


def test_start_scheduler_never_returns_a_dead_actor(
    store: Store, fault_url: str, scheduler_name: str, tmp_path: Path
) -> None:
    marker = tmp_path / "incarnation"
    doomed = _Doomed.options(  # type: ignore[attr-defined]
        name=scheduler_name, namespace="taskray", lifetime="detached"
    ).remote(str(marker))
    ray.get(doomed.ready.remote())
    ray.kill(doomed, no_restart=False)
    wait_for(lambda: marker.read_text() == "restarting")

    handle = start_scheduler(fault_url, CONFIG, name=scheduler_name)
    assert handle._actor_id != doomed._actor_id
    succeeded(store, add(store, 3, 4), timeout_s=60)


def test_a_commit_in_flight_across_a_restart_lands_once(
    store: Store,
    fault_url: str,
    pg: PrivatePostgres,
    scheduler_name: str,
    tmp_path: Path,
    record_property: Any,
) -> None:
    with store.engine.begin() as connection:
        connection.exec_driver_sql(SINK_DDL)
    release, calls = tmp_path / "release", tmp_path / "calls"
    payload = {"args": [str(release), str(calls)]}
    start_scheduler(fault_url, CONFIG, name=scheduler_name)
    # One result goes through the agent's group commit, one with a write of its handler's
    # in the same transaction (the executor's own commit call).
    plain = store.submit(
        make_spec("tests.faults.handlers:held", payload={**payload, "kwargs": {"tag": "plain"}})
    ).task
    sunk = store.submit(
        make_spec(
            "tests.faults.handlers:held_then_sink", payload={**payload, "kwargs": {"tag": "sunk"}}
        )
    ).task
    wait_for(
        lambda: all(t.status is TaskState.RUNNING for t in store.get_many([plain.id, sunk.id])),
        timeout_s=60,
    )

    # The node agent's pooled connections and the executors' start all predate this.
    pg.restart()
    back = time.monotonic()
    release.touch()
    done = [succeeded(store, t, timeout_s=RECOVERY_DEADLINE_S) for t in (plain, sunk)]
    recovery_s = time.monotonic() - back
    record_property("recovery_s", round(recovery_s, 3))
    print(f"commits across a database restart: both landed {recovery_s:.2f} s after it")

    assert [t.result for t in done] == ["plain", "sunk"]
    assert len(calls.read_text().splitlines()) == 2  # each handler ran once
    for task in done:
        [attempt] = store.attempts(task.id)
        assert attempt.outcome is AttemptOutcome.SUCCEEDED
    with store.engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT tag FROM sink")).scalars().all()
    assert rows == ["sunk"]


def test_a_connection_left_idle_across_a_restart_is_replaced_before_use(
    fault_url: str, pg: PrivatePostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pooled connections are checked only after sitting idle (not on every checkout):
    one idle across a restart is replaced before use; one in steady use fails once, and
    its caller retries."""
    checked = Store.open(fault_url, migrate=False)
    unchecked = Store.open(fault_url, migrate=False)
    try:
        checked.now(), unchecked.now()  # one pooled connection each
        pg.restart()
        monkeypatch.setattr(engines, "IDLE_PING_S", 0.0)  # idle long enough: checked
        checked.now()
        monkeypatch.setattr(engines, "IDLE_PING_S", 3600.0)  # in steady use: not checked
        with pytest.raises(StoreUnavailableError):
            unchecked.now()
        unchecked.now()  # the cut connection went with the failure
    finally:
        checked.close()
        unchecked.close()
