"""Contract tests for every store operation, run on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from taskray.errors import (
    CycleError,
    InvalidPriorityError,
    InvalidResourcesError,
    InvalidStateError,
    InvalidTaskError,
    LeaseLostError,
    NotLeaderError,
    PayloadTooLargeError,
    UnknownTaskError,
)
from taskray.models import AttemptOutcome, LeaseRequest, Resources, TaskState
from taskray.store import Store
from taskray.testing import FakeClock, make_spec


def lease_one(store: Store, node: str | None = "node-1", ttl_s: float | None = None):
    leases = store.claim(1, node_id=node, ttl_s=ttl_s)
    assert len(leases) == 1
    return leases[0]


def total(store: Store) -> int:
    return sum(store.count_by_status().values())


# -- submit -----------------------------------------------------------------------------------


def test_submit_stores_every_field(store: Store, clock: FakeClock) -> None:
    spec = make_spec(
        "reports:build",
        payload={"month": "2030-01", "rows": [1, 2, 3]},
        queue="reports",
        tenant="acme",
        priority=7,
        timeout_s=90,
        max_retries=5,
        backoff_base_s=2.0,
        backoff_cap_s=30.0,
        resources=Resources(num_cpus=2, num_gpus=1, memory=4 << 30, custom={"accel": 1}),
        labels={"team": "data"},
        metadata={"owner": "ana"},
        idempotency_key="report-2030-01",
    )
    submitted = store.submit(spec)
    assert not submitted.deduplicated
    task = store.get(submitted.task.id)
    assert task == submitted.task
    assert task.status is TaskState.QUEUED
    assert task.payload == {"month": "2030-01", "rows": [1, 2, 3]}
    assert (task.queue, task.tenant, task.type, task.priority) == (
        "reports",
        "acme",
        "reports:build",
        7,
    )
    assert task.timeout_s == 90
    assert task.retry.max_retries == 5 and task.retry.backoff_base_s == 2.0
    assert task.resources == Resources(num_cpus=2, num_gpus=1, memory=4 << 30, custom={"accel": 1})
    assert task.labels == {"team": "data"} and task.metadata == {"owner": "ana"}
    assert task.created_at == clock.now() == task.scheduled_at
    assert task.attempt == 0 and task.lease_id is None


def test_delay_sets_scheduled_at_from_the_store_clock(store: Store, clock: FakeClock) -> None:
    task = store.submit(make_spec(delay_s=60)).task
    assert (task.scheduled_at - clock.now()).total_seconds() == 60
    assert store.candidates() == []
    clock.advance(59.9)
    assert store.claim(10) == []
    clock.advance(0.1)
    assert [c.id for c in store.candidates()] == [task.id]


def test_idempotency_key_returns_the_first_task(store: Store) -> None:
    first = store.submit(make_spec(idempotency_key="k", payload=1))
    again = store.submit(make_spec(idempotency_key="k", payload=2))
    assert again.deduplicated and again.task.id == first.task.id and again.task.payload == 1
    # Keys are unique per tenant: another tenant's identical key is another task.
    other = store.submit(make_spec(idempotency_key="k", tenant="other"))
    assert not other.deduplicated and other.task.id != first.task.id
    # Within one batch too.
    batch = store.submit_many([make_spec(idempotency_key="b"), make_spec(idempotency_key="b")])
    assert [r.deduplicated for r in batch] == [False, True]
    assert batch[0].task.id == batch[1].task.id
    assert total(store) == 3


def test_submit_many_dag_with_batch_keys_and_stored_upstreams(store: Store) -> None:
    stored = store.submit(make_spec(key="x")).task
    results = store.submit_many(
        [
            make_spec(key="report", depends_on=["left", "right"]),
            make_spec(key="left", depends_on=[stored.id]),
            make_spec(key="right"),
        ]
    )
    report, left, right = (r.task for r in results)
    assert report.status is TaskState.BLOCKED and report.pending_upstreams == 2
    assert left.status is TaskState.BLOCKED and left.pending_upstreams == 1
    assert right.status is TaskState.QUEUED
    assert sorted(store.upstreams(report.id)) == sorted([left.id, right.id])
    assert store.upstreams(left.id) == [stored.id]
    # str ids are accepted as well as UUIDs
    child = store.submit(make_spec(depends_on=[str(right.id)])).task
    assert child.status is TaskState.BLOCKED


def test_dependency_on_a_succeeded_task_is_ready_and_on_a_dead_one_fails(store: Store) -> None:
    done = store.submit(make_spec()).task
    lease = lease_one(store)
    store.complete(done.id, lease.lease_id, "ok")
    assert store.submit(make_spec(depends_on=[done.id])).task.status is TaskState.QUEUED
    doomed = store.submit(make_spec(max_retries=0)).task
    lease = lease_one(store)
    assert lease.task.id != done.id
    lease = lease if lease.task.id == doomed.id else lease_one(store)
    store.fail(doomed.id, lease.lease_id, "boom")
    child = store.submit(make_spec(depends_on=[doomed.id])).task
    assert child.status is TaskState.UPSTREAM_FAILED
    assert child.last_error and str(doomed.id) in child.last_error


def test_a_cycle_is_refused_with_the_cycle_named(store: Store) -> None:
    with pytest.raises(CycleError) as caught:
        store.submit_many(
            [
                make_spec(key="a", depends_on=["c"]),
                make_spec(key="b", depends_on=["a"]),
                make_spec(key="c", depends_on=["b"]),
                make_spec(key="free"),
            ]
        )
    assert caught.value.cycle[0] == caught.value.cycle[-1]
    assert set(caught.value.cycle) == {"a", "b", "c"}
    assert "a" in str(caught.value) and "->" in str(caught.value)
    with pytest.raises(CycleError):
        store.submit(make_spec(key="self", depends_on=["self"]))
    assert total(store) == 0


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"priority": -1}, InvalidPriorityError),
        ({"priority": 10_001}, InvalidPriorityError),
        ({"priority": 1.5}, InvalidPriorityError),
        ({"resources": Resources(num_cpus=-1)}, InvalidResourcesError),
        ({"resources": Resources(num_gpus=1.5)}, InvalidResourcesError),
        ({"resources": Resources(num_cpus=float("nan"))}, InvalidResourcesError),
        ({"resources": Resources(custom={"GPU": 1})}, InvalidResourcesError),
        ({"resources": Resources(custom={"accel": 0})}, InvalidResourcesError),
        ({"resources": Resources(memory=-5)}, InvalidResourcesError),
        ({"payload": "x" * 2_000_000}, PayloadTooLargeError),
        ({"payload": {"bad": object()}}, InvalidTaskError),
        ({"timeout_s": 0}, InvalidTaskError),
        ({"delay_s": -1}, InvalidTaskError),
        ({"queue": ""}, InvalidTaskError),
        ({"max_retries": -1}, InvalidTaskError),
        ({"depends_on": [uuid.uuid4()]}, UnknownTaskError),
        ({"depends_on": ["no-such-key"]}, UnknownTaskError),
    ],
)
def test_bad_input_raises_a_typed_error_and_changes_nothing(
    store: Store, overrides: dict[str, object], error: type[Exception]
) -> None:
    store.submit(make_spec())
    with pytest.raises(error):
        # The bad spec rides in a batch after a good one: nothing of the batch may land.
        store.submit_many([make_spec(), make_spec(**overrides)])
    assert total(store) == 1


def test_unknown_type_name_and_duplicate_batch_key_are_refused(store: Store) -> None:
    with pytest.raises(InvalidTaskError):
        store.submit(make_spec("not a valid name!"))
    with pytest.raises(InvalidTaskError):
        store.submit_many([make_spec(key="k"), make_spec(key="k")])
    assert total(store) == 0


def test_dependencies_do_not_cross_tenants(store: Store) -> None:
    theirs = store.submit(make_spec(tenant="a")).task
    with pytest.raises(UnknownTaskError):
        store.submit(make_spec(tenant="b", depends_on=[theirs.id]))
    with pytest.raises(UnknownTaskError):
        store.get(theirs.id, tenant="b")
    assert store.get(theirs.id, tenant="a").id == theirs.id


# -- candidates and leases --------------------------------------------------------------------


def test_candidates_are_in_priority_then_age_order(store: Store, clock: FakeClock) -> None:
    low_old = store.submit(make_spec(priority=1)).task
    clock.advance(1)
    high = store.submit(make_spec(priority=9)).task
    clock.advance(1)
    low_new = store.submit(make_spec(priority=1)).task
    blocked = store.submit(make_spec(priority=100, depends_on=[low_new.id])).task
    later = store.submit(make_spec(priority=100, delay_s=5)).task
    ids = [t.id for t in store.candidates()]
    assert ids == [high.id, low_old.id, low_new.id]
    assert blocked.id not in ids and later.id not in ids
    assert [t.id for t in store.candidates(queues=["other"])] == []
    assert store.next_scheduled_at() == low_old.scheduled_at
    assert store.next_scheduled_at(queues=["other"]) is None
    delayed = store.submit(make_spec(priority=3, queue="other", delay_s=60)).task
    assert store.next_scheduled_at(queues=["other"]) == delayed.scheduled_at
    assert store.next_scheduled_at() == low_old.scheduled_at
    claimed = store.claim(2, node_id="n")
    assert [lease.task.id for lease in claimed] == [high.id, low_old.id]


def test_lease_grants_the_chosen_tasks_on_their_nodes(store: Store, clock: FakeClock) -> None:
    a, b, c = (store.submit(make_spec()).task for _ in range(3))
    leases = store.lease([LeaseRequest(a.id, "n1"), LeaseRequest(c.id, "n2")], epoch=None, ttl_s=10)
    assert {(lease.task.id, lease.task.node_id) for lease in leases} == {(a.id, "n1"), (c.id, "n2")}
    for lease in leases:
        assert lease.task.status is TaskState.LEASED
        assert lease.task.lease_id == lease.lease_id
        assert lease.task.attempt == 1
        assert lease.expires_at == clock.now() + (lease.expires_at - clock.now())
        assert (lease.expires_at - clock.now()).total_seconds() == 10
    # Already leased: skipped, never leased twice.
    again = store.lease([LeaseRequest(a.id, "n3"), LeaseRequest(b.id, "n3")], epoch=None)
    assert [lease.task.id for lease in again] == [b.id]
    assert store.get(a.id).node_id == "n1"
    attempts = store.attempts(a.id)
    assert [(x.attempt, x.node_id, x.outcome) for x in attempts] == [(1, "n1", None)]


def test_lease_is_fenced_by_the_leader_epoch(store: Store, clock: FakeClock) -> None:
    task = store.submit(make_spec()).task
    epoch = store.acquire_leadership("scheduler-a", ttl_s=10)
    assert epoch == 1
    assert store.acquire_leadership("scheduler-b", ttl_s=10) is None
    assert store.acquire_leadership("scheduler-a", ttl_s=10) == 1  # renewal keeps the epoch
    leadership = store.leadership()
    assert leadership is not None and leadership.holder == "scheduler-a"
    clock.advance(11)
    assert store.leadership() is None
    new_epoch = store.acquire_leadership("scheduler-b", ttl_s=10)
    assert new_epoch == 2
    with pytest.raises(NotLeaderError):
        store.lease([LeaseRequest(task.id, "n")], epoch=epoch)
    with pytest.raises(NotLeaderError):
        store.claim(1, epoch=epoch)
    assert store.get(task.id).status is TaskState.QUEUED
    leases = store.lease([LeaseRequest(task.id, "n")], epoch=new_epoch)
    assert leases[0].task.epoch == new_epoch
    store.release_leadership("scheduler-b")
    assert store.acquire_leadership("scheduler-a") == 3


# -- execution --------------------------------------------------------------------------------


def test_start_heartbeat_complete(store: Store, clock: FakeClock) -> None:
    task = store.submit(make_spec()).task
    lease = lease_one(store, ttl_s=30)
    clock.advance(1)
    running = store.start(task.id, lease.lease_id, worker_id="w-1")
    assert running.status is TaskState.RUNNING and running.started_at == clock.now()
    clock.advance(20)
    expires = store.heartbeat(task.id, lease.lease_id, ttl_s=30)
    assert (
        expires == clock.now() + (expires - clock.now())
        and (expires - clock.now()).total_seconds() == 30
    )
    clock.advance(25)  # past the first expiry, within the extended one
    done = store.complete(task.id, lease.lease_id, {"rows": 3})
    assert done.status is TaskState.SUCCEEDED and done.result == {"rows": 3}
    assert done.completed_at == clock.now()
    [attempt] = store.attempts(task.id)
    assert attempt.outcome is AttemptOutcome.SUCCEEDED and attempt.worker_id == "w-1"
    assert attempt.started_at is not None and attempt.finished_at == clock.now()


def test_a_result_commits_once_and_only_with_the_live_lease(store: Store, clock: FakeClock) -> None:
    task = store.submit(make_spec()).task
    lease = lease_one(store, ttl_s=5)
    with pytest.raises(LeaseLostError):
        store.complete(task.id, uuid.uuid4(), "forged")
    writes: list[str] = []
    store.complete(task.id, lease.lease_id, "first", write=lambda _c: writes.append("first"))
    # The same lease again (a retry whose reply was lost): told it committed, and neither
    # its result nor its write is written again.
    clock.advance(10)
    again = store.complete(task.id, lease.lease_id, "second", write=lambda _c: writes.append("2"))
    assert again.status is TaskState.SUCCEEDED and again.result == "first"
    assert writes == ["first"]
    with pytest.raises(LeaseLostError):
        store.complete(task.id, uuid.uuid4(), "forged")
    with pytest.raises(LeaseLostError):
        store.heartbeat(task.id, lease.lease_id)
    assert store.get(task.id).result == "first"
    assert [a.outcome for a in store.attempts(task.id)] == [AttemptOutcome.SUCCEEDED]


def test_an_expired_lease_is_lost_and_reaped(store: Store, clock: FakeClock) -> None:
    task = store.submit(make_spec(max_retries=1, backoff_base_s=4)).task
    lease = lease_one(store, ttl_s=5)
    store.start(task.id, lease.lease_id)
    clock.advance(5)
    with pytest.raises(LeaseLostError):
        store.heartbeat(task.id, lease.lease_id)
    with pytest.raises(LeaseLostError):
        store.complete(task.id, lease.lease_id, "late")
    [reaped] = store.reap()
    assert reaped.status is TaskState.QUEUED and reaped.lease_id is None
    assert (reaped.scheduled_at - clock.now()).total_seconds() == 4
    assert store.attempts(task.id)[0].outcome is AttemptOutcome.LEASE_EXPIRED
    assert store.reap() == []
    clock.advance(4)
    second = lease_one(store, ttl_s=5)
    assert second.task.attempt == 2
    clock.advance(6)
    [dead] = store.reap()
    assert dead.status is TaskState.DEAD and "lease expired" in (dead.last_error or "")
    # The stale first lease cannot complete it now either.
    with pytest.raises(LeaseLostError):
        store.complete(task.id, second.lease_id, "late")


def test_fail_retries_with_exponential_backoff_then_dead_letters(
    store: Store, clock: FakeClock
) -> None:
    task = store.submit(make_spec(max_retries=3, backoff_base_s=1, backoff_cap_s=3)).task
    delays = []
    for attempt in range(1, 4):
        lease = lease_one(store)
        assert lease.task.attempt == attempt
        failed = store.fail(task.id, lease.lease_id, f"boom {attempt}", traceback="Traceback ...")
        assert failed.status is TaskState.QUEUED and failed.last_error == f"boom {attempt}"
        delays.append((failed.scheduled_at - clock.now()).total_seconds())
        assert store.claim(1) == []  # not before its backoff
        clock.advance(delays[-1])
    assert delays == [1, 2, 3]  # doubling, capped; jitter 0
    lease = lease_one(store)
    dead = store.fail(task.id, lease.lease_id, "boom 4", traceback="Traceback ...")
    assert dead.status is TaskState.DEAD and "retries exhausted" in (dead.last_error or "")
    attempts = store.attempts(task.id)
    assert [a.outcome for a in attempts] == [AttemptOutcome.FAILED] * 4
    assert [a.error for a in attempts] == ["boom 1", "boom 2", "boom 3", "boom 4"]
    assert all(a.traceback == "Traceback ..." for a in attempts)


def test_jitter_spreads_backoff_within_its_bounds(
    make_store: Callable[..., Store], clock: FakeClock
) -> None:
    store = make_store(clock=clock)
    delays = set()
    for _ in range(8):
        task = store.submit(make_spec(max_retries=1, backoff_base_s=10, jitter=0.5)).task
        lease = store.lease([LeaseRequest(task.id)], epoch=None)[0]
        failed = store.fail(task.id, lease.lease_id, "x")
        delay = (failed.scheduled_at - clock.now()).total_seconds()
        assert 5 <= delay <= 10
        delays.add(round(delay, 6))
    assert len(delays) > 1


def test_non_retryable_failure_goes_dead_at_once_and_fails_downstream(store: Store) -> None:
    up = store.submit(make_spec(key="up", max_retries=5)).task
    mid, leaf = (
        r.task
        for r in store.submit_many(
            [make_spec(key="mid", depends_on=[up.id]), make_spec(key="leaf", depends_on=["mid"])]
        )
    )
    lease = lease_one(store)
    dead = store.fail(up.id, lease.lease_id, "poison", retryable=False)
    assert dead.status is TaskState.DEAD and dead.attempt == 1
    assert store.get(mid.id).status is TaskState.UPSTREAM_FAILED
    assert store.get(leaf.id).status is TaskState.UPSTREAM_FAILED
    assert [t.id for t in store.list_dead()] == [up.id]


def test_complete_releases_downstream_when_all_upstreams_succeed(store: Store) -> None:
    a, b, join = (
        r.task
        for r in store.submit_many(
            [make_spec(key="a"), make_spec(key="b"), make_spec(key="join", depends_on=["a", "b"])]
        )
    )
    leases = {lease.task.id: lease for lease in store.claim(10)}
    assert set(leases) == {a.id, b.id}
    store.complete(a.id, leases[a.id].lease_id)
    after_one = store.get(join.id)
    assert after_one.status is TaskState.BLOCKED and after_one.pending_upstreams == 1
    store.complete(b.id, leases[b.id].lease_id)
    released = store.get(join.id)
    assert released.status is TaskState.QUEUED and released.pending_upstreams == 0
    assert [lease.task.id for lease in store.claim(10)] == [join.id]


def test_complete_runs_the_handlers_writes_in_its_transaction(store: Store) -> None:
    sink = sa.Table("sink", sa.MetaData(), sa.Column("task_id", sa.String(64), primary_key=True))
    sink.create(store.engine)
    task = store.submit(make_spec()).task
    lease = lease_one(store)

    def failing_write(connection: sa.Connection) -> None:
        connection.execute(sa.insert(sink).values(task_id=str(task.id)))
        raise RuntimeError("sink rejected the row")

    with pytest.raises(RuntimeError):
        store.complete(task.id, lease.lease_id, "r", write=failing_write)
    # Rolled back together: no sink row, task still live.
    assert store.get(task.id).status is TaskState.LEASED
    with store.engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(sink)).scalar_one() == 0

    store.complete(
        task.id,
        lease.lease_id,
        "r",
        write=lambda c: c.execute(sa.insert(sink).values(task_id=str(task.id))) and None,
    )
    with store.engine.connect() as connection:
        assert connection.execute(sa.select(sink.c.task_id)).scalars().all() == [str(task.id)]
    assert store.get(task.id).status is TaskState.SUCCEEDED


def test_oversized_or_unserialisable_result_is_refused(make_store: Callable[..., Store]) -> None:
    store = make_store(max_payload_bytes=100)
    task = store.submit(make_spec()).task
    lease = lease_one(store)
    with pytest.raises(PayloadTooLargeError):
        store.complete(task.id, lease.lease_id, "x" * 200)
    with pytest.raises(InvalidTaskError):
        store.complete(task.id, lease.lease_id, {1, 2})
    assert store.get(task.id).status is TaskState.LEASED


def test_start_needs_a_leased_task(store: Store, clock: FakeClock) -> None:
    task = store.submit(make_spec()).task
    with pytest.raises(LeaseLostError):
        store.start(task.id, uuid.uuid4())
    lease = lease_one(store, ttl_s=5)
    running = store.start(task.id, lease.lease_id)
    # Already running under this lease (a retry whose reply was lost): returned as it is.
    clock.advance(1)
    again = store.start(task.id, lease.lease_id)
    assert again.status is TaskState.RUNNING and again.started_at == running.started_at
    with pytest.raises(LeaseLostError):
        store.start(task.id, uuid.uuid4())
    clock.advance(5)
    with pytest.raises(LeaseLostError):
        store.start(task.id, lease.lease_id)  # its lease ran out


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_queued_running_and_finished(store: Store) -> None:
    queued = store.submit(make_spec(key="q")).task
    child = store.submit(make_spec(depends_on=[queued.id])).task
    cancelled = store.cancel(queued.id)
    assert cancelled.status is TaskState.CANCELLED
    assert store.get(child.id).status is TaskState.UPSTREAM_FAILED

    running = store.submit(make_spec()).task
    lease = lease_one(store)
    store.start(running.id, lease.lease_id)
    store.cancel(running.id, reason="user asked")
    with pytest.raises(LeaseLostError):
        store.heartbeat(running.id, lease.lease_id)
    with pytest.raises(LeaseLostError):
        store.complete(running.id, lease.lease_id)
    assert store.attempts(running.id)[0].outcome is AttemptOutcome.CANCELLED
    with pytest.raises(InvalidStateError):
        store.cancel(running.id)
    with pytest.raises(UnknownTaskError):
        store.cancel(uuid.uuid4())


# -- dead letters -----------------------------------------------------------------------------


def _dead_task(store: Store, **overrides: object) -> uuid.UUID:
    task = store.submit(make_spec(max_retries=0, **overrides)).task
    lease = store.lease([LeaseRequest(task.id)], epoch=None)[0]
    store.fail(task.id, lease.lease_id, "boom")
    return task.id


def test_replay_requeues_with_a_fresh_budget_and_revives_downstream(store: Store) -> None:
    dead = _dead_task(store, key="d")
    child = store.submit(make_spec(depends_on=[dead])).task
    assert child.status is TaskState.UPSTREAM_FAILED
    [replayed] = store.replay([dead])
    assert replayed.status is TaskState.QUEUED and replayed.completed_at is None
    revived = store.get(child.id)
    assert revived.status is TaskState.BLOCKED and revived.pending_upstreams == 1
    lease = store.lease([LeaseRequest(dead)], epoch=None)[0]
    assert lease.task.attempt == 2
    # max_retries=0: the replayed try is again the only one allowed.
    again = store.fail(dead, lease.lease_id, "still broken")
    assert again.status is TaskState.DEAD
    assert store.get(child.id).status is TaskState.UPSTREAM_FAILED
    assert [a.attempt for a in store.attempts(dead)] == [1, 2]


def test_replay_refuses_tasks_that_are_not_dead(store: Store) -> None:
    alive = store.submit(make_spec()).task
    dead = _dead_task(store)
    with pytest.raises(InvalidStateError):
        store.replay([dead, alive.id])
    with pytest.raises(UnknownTaskError):
        store.replay([uuid.uuid4()])
    assert store.get(dead).status is TaskState.DEAD


def test_replay_and_purge_by_filter(store: Store, clock: FakeClock) -> None:
    old = _dead_task(store, queue="etl")
    clock.advance(3600)
    new_etl = _dead_task(store, queue="etl")
    other = _dead_task(store, queue="ml")
    assert {t.id for t in store.list_dead(queue="etl")} == {old, new_etl}
    assert store.purge(older_than=clock.now()) == 1
    with pytest.raises(UnknownTaskError):
        store.get(old)
    assert [t.id for t in store.replay(queue="ml")] == [other]
    assert store.purge([other]) == 0  # no longer dead
    assert store.purge(queue="etl") == 1
    assert [t.id for t in store.list_dead()] == []


def test_purge_removes_attempts_and_edges(store: Store) -> None:
    dead = _dead_task(store)
    child = store.submit(make_spec(depends_on=[dead])).task
    assert store.purge([dead]) == 1
    assert store.upstreams(child.id) == []
    assert store.get(child.id).status is TaskState.UPSTREAM_FAILED


def test_a_fresh_acquisition_by_the_same_holder_fences_its_predecessor(store: Store) -> None:
    task = store.submit(make_spec()).task
    first = store.acquire_leadership("actor:1", ttl_s=30)
    again = store.acquire_leadership("actor:1", ttl_s=30, fresh=True)
    assert first is not None and again == first + 1
    with pytest.raises(NotLeaderError):
        store.lease([LeaseRequest(task.id, "n")], epoch=first)
    assert store.lease([LeaseRequest(task.id, "n")], epoch=again)[0].task.epoch == again


def test_a_batch_key_does_not_reach_another_tenants_task(store: Store) -> None:
    with pytest.raises(UnknownTaskError):
        store.submit_many(
            [
                make_spec(tenant="acme", key="good"),
                make_spec(tenant="umbrella", depends_on=["good"]),
            ]
        )
    assert total(store) == 0


def test_a_key_repeated_in_a_batch_goes_to_the_first_spec_in_batch_order(store: Store) -> None:
    # The first spec depends on the second, so dependency order alone would put the
    # second first; the repeat must still return the first spec's task.
    results = store.submit_many(
        [
            make_spec(key="reader", depends_on=["second"]),
            make_spec(key="first", idempotency_key="k", payload="first"),
            make_spec(key="second", idempotency_key="k", payload="second"),
        ]
    )
    first, second = results[1], results[2]
    assert not first.deduplicated and first.task.payload == "first"
    assert second.deduplicated and second.task.id == first.task.id
    assert store.upstreams(results[0].task.id) == [first.task.id]
    assert total(store) == 2


# -- notifications ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_done_listener_wakes_when_a_task_finishes_and_only_then(store: Store) -> None:
    task = store.submit(make_spec()).task
    other = store.submit(make_spec(max_retries=3)).task
    listener = store.done_listener()
    try:
        # Submitting, leasing, starting and a retried failure finish nothing.
        first, second = store.lease(
            [LeaseRequest(task.id, "node-1"), LeaseRequest(other.id, "node-1")], epoch=None
        )
        store.start(task.id, first.lease_id)
        retried = store.fail(other.id, second.lease_id, "transient", retryable=True)
        assert retried.status is TaskState.QUEUED
        assert listener.wait(0.2) is False
        store.complete(task.id, first.lease_id, "ok")
        assert listener.wait(5.0) is True
        assert listener.wait(0.2) is False  # one wake-up per commit, none left over
        store.cancel(other.id)
        assert listener.wait(5.0) is True
    finally:
        listener.close()
