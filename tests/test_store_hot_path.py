"""The batched path (ready, lease_many, start_many, heartbeat_many, complete_many, fail_many)
on both backends, with an injected clock and with the database's own clock (on PostgreSQL
the statements then use ``now()`` themselves: a different SQL path)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from taskray.errors import NotLeaderError
from taskray.models import AttemptOutcome, Failure, LeaseRequest, Resources, Success, TaskState
from taskray.store import Store
from taskray.testing import FakeClock, make_spec

CLOCKS = ["fake", "database"]


@pytest.fixture(params=CLOCKS)
def hot_store(
    request: pytest.FixtureRequest, make_store: Callable[..., Store], clock: FakeClock
) -> Store:
    if request.param == "fake":
        return make_store(clock=clock)
    return make_store()


def submit_n(store: Store, n: int, **overrides: object) -> list[uuid.UUID]:
    return [r.task.id for r in store.submit_many([make_spec(**overrides) for _ in range(n)])]


def lease_all(store: Store, ids: list[uuid.UUID], node: str = "node-1"):
    grants = store.lease_many([(t, node) for t in ids], epoch=None, ttl_s=30)
    assert [g.task_id for g in grants] == ids
    return [(g.task_id, g.lease_id) for g in grants]


def test_ready_reads_no_payload_in_priority_order(hot_store: Store) -> None:
    low = hot_store.submit(make_spec(priority=1, payload={"big": "x" * 1000})).task
    high = hot_store.submit(
        make_spec(
            priority=9,
            timeout_s=5,
            resources=Resources(num_cpus=2, num_gpus=1, memory=1 << 30, custom={"acc": 1}),
            labels={"node:zone": "a"},
            metadata={"taskray:worker": "fresh"},
        )
    ).task
    ready = hot_store.ready(10)
    assert [t.id for t in ready] == [high.id, low.id]
    first = ready[0]
    assert first.resources == high.resources
    assert first.timeout_s == 5
    assert first.labels == {"node:zone": "a"}
    assert first.metadata == {"taskray:worker": "fresh"}
    assert not hasattr(first, "payload")
    assert len(hot_store.ready(1)) == 1


def test_lease_many_grants_and_skips_what_is_gone(hot_store: Store) -> None:
    a, b, c = submit_n(hot_store, 3)
    hot_store.cancel(b)
    grants = hot_store.lease_many([(a, "n1"), (b, "n1"), (c, "n2")], epoch=None, ttl_s=30)
    assert [(g.task_id, g.node_id, g.attempt) for g in grants] == [(a, "n1", 1), (c, "n2", 1)]
    task = hot_store.get(c)
    assert task.status is TaskState.LEASED
    assert task.lease_id == grants[1].lease_id
    assert task.node_id == "n2"
    assert [x.lease_id for x in hot_store.attempts(c)] == [grants[1].lease_id]
    # Leased tasks are no longer ready, and a second lease of them grants nothing.
    assert hot_store.ready(10) == []
    assert hot_store.lease_many([(a, "n1")], epoch=None) == []


def test_a_batch_with_stale_leases_commits_the_rest_once(
    hot_store: Store, clock: FakeClock
) -> None:
    """The fence is per row: stale rows are refused and named, the others commit once."""
    ids = submit_n(hot_store, 6)
    leases = lease_all(hot_store, ids)
    started = hot_store.start_many(leases, worker_id="w1")
    assert [t.id for t in started.tasks] == ids
    assert all(t.status is TaskState.RUNNING for t in started.tasks)
    assert started.refused == []
    # Two leases go stale: one task is cancelled, one is reaped and leased again.
    hot_store.cancel(ids[1])
    stale_lease = leases[4][1]
    with hot_store.transaction() as (connection, _):
        connection.exec_driver_sql(
            "UPDATE tasks SET lease_id = NULL, status = 'queued' WHERE id = "
            + ("'" + (str(ids[4]) if hot_store.is_postgres else ids[4].hex) + "'")
        )
    released = hot_store.lease_many([(ids[4], "node-2")], epoch=None)
    assert released and released[0].lease_id != stale_lease
    outcome = hot_store.complete_many(
        [Success(t, lease, {"n": i}) for i, (t, lease) in enumerate(leases)]
    )
    assert outcome.refused == [ids[1], ids[4]]
    assert outcome.committed == [ids[0], ids[2], ids[3], ids[5]]
    for i in (0, 2, 3, 5):
        task = hot_store.get(ids[i])
        assert task.status is TaskState.SUCCEEDED
        assert task.result == {"n": i}
        assert hot_store.attempts(ids[i])[-1].outcome is AttemptOutcome.SUCCEEDED
        assert hot_store.attempts(ids[i])[-1].worker_id == "w1"
    assert hot_store.get(ids[1]).status is TaskState.CANCELLED
    assert hot_store.get(ids[4]).status is TaskState.LEASED
    # Committing again changes nothing: the stale rows are refused again, and the committed
    # ones are reported committed (a retry whose reply was lost) without being written again.
    again = hot_store.complete_many([Success(t, lease, "late") for t, lease in leases])
    assert again.committed == [ids[0], ids[2], ids[3], ids[5]]
    assert again.refused == [ids[1], ids[4]]
    assert hot_store.get(ids[0]).result == {"n": 0}
    assert hot_store.get(ids[4]).status is TaskState.LEASED


def test_a_start_retried_after_its_reply_was_lost_succeeds(
    hot_store: Store, clock: FakeClock
) -> None:
    """The executor retries a start whose commit landed but whose reply was lost: the retry
    gets the tasks as started, their start as it was, and only under their own lease."""
    first_id, second_id = submit_n(hot_store, 2)
    leases = lease_all(hot_store, [first_id, second_id])
    first = hot_store.start_many(leases[:1], worker_id="w1")
    clock.advance(1)
    again = hot_store.start_many(leases, worker_id="w1")
    assert [t.id for t in again.tasks] == [first_id, second_id]
    assert again.refused == []
    assert all(t.status is TaskState.RUNNING for t in again.tasks)
    started_at = first.tasks[0].started_at
    assert again.tasks[0].started_at == started_at
    assert hot_store.get(first_id).started_at == started_at
    [attempt] = hot_store.attempts(first_id)
    assert attempt.started_at == started_at and attempt.worker_id == "w1"
    stale = hot_store.start_many([(first_id, uuid.uuid4()), (second_id, leases[1][1])])
    assert stale.refused == [first_id]
    assert [t.id for t in stale.tasks] == [second_id]


def test_a_complete_retried_after_its_reply_was_lost_is_reported_once(hot_store: Store) -> None:
    """A retried commit whose first try landed is reported committed, and writes nothing:
    not the result, not the attempt, and it releases no downstream task a second time."""
    results = hot_store.submit_many(
        [make_spec(key="a"), make_spec(key="b"), make_spec(key="both", depends_on=["a", "b"])]
    )
    a, b, both = (r.task.id for r in results)
    (lease_a, lease_b) = (lease for _, lease in lease_all(hot_store, [a, b]))
    hot_store.start_many([(a, lease_a), (b, lease_b)])
    assert hot_store.complete_many([Success(a, lease_a, 1)]).committed == [a]
    again = hot_store.complete_many([Success(a, lease_a, "retried")])
    assert again.committed == [a] and again.refused == []
    assert hot_store.get(a).result == 1
    assert [x.outcome for x in hot_store.attempts(a)] == [AttemptOutcome.SUCCEEDED]
    downstream = hot_store.get(both)
    assert downstream.status is TaskState.BLOCKED and downstream.pending_upstreams == 1
    # Only the lease that committed it: any other is refused.
    assert hot_store.complete_many([Success(a, uuid.uuid4(), "forged")]).refused == [a]
    assert hot_store.complete_many([Success(b, lease_b, 2)]).committed == [b]
    assert hot_store.get(both).status is TaskState.QUEUED


def test_start_many_refuses_stale_leases(hot_store: Store) -> None:
    a, b, c = submit_n(hot_store, 3)
    leases = lease_all(hot_store, [a, b, c])
    hot_store.cancel(b)
    started = hot_store.start_many([leases[0], leases[1], (c, uuid.uuid4())])
    assert [t.id for t in started.tasks] == [a]
    assert started.refused == [b, c]
    assert hot_store.get(c).status is TaskState.LEASED


def test_heartbeat_many_extends_live_leases_only(hot_store: Store, clock: FakeClock) -> None:
    a, b = submit_n(hot_store, 2)
    leases = lease_all(hot_store, [a, b])
    before = hot_store.get(a).lease_expires_at
    hot_store.cancel(b)
    clock.advance(10)
    renewed = hot_store.heartbeat_many(leases, ttl_s=120)
    assert renewed.committed == [a]
    assert renewed.refused == [b]
    after = hot_store.get(a).lease_expires_at
    assert after is not None and before is not None and after > before


def test_fail_many_retries_dead_letters_and_refuses(hot_store: Store) -> None:
    retry, dead, gone = submit_n(hot_store, 3, max_retries=1)
    leases = dict(lease_all(hot_store, [retry, dead, gone]))
    hot_store.cancel(gone)
    states = hot_store.fail_many(
        [
            Failure(retry, leases[retry], "ValueError: once"),
            Failure(dead, leases[dead], "KeyError: never", retryable=False),
            Failure(gone, leases[gone], "late"),
        ]
    )
    assert states == {retry: TaskState.QUEUED, dead: TaskState.DEAD, gone: None}
    assert hot_store.get(retry).last_error == "ValueError: once"
    assert hot_store.attempts(dead)[-1].outcome is AttemptOutcome.FAILED


def test_complete_many_releases_downstream(hot_store: Store) -> None:
    results = hot_store.submit_many(
        [
            make_spec(key="a"),
            make_spec(key="b"),
            make_spec(key="both", depends_on=["a", "b"]),
            make_spec(key="after-a", depends_on=["a"]),
        ]
    )
    a, b, both, after_a = (r.task.id for r in results)
    leases = lease_all(hot_store, [a, b])
    hot_store.complete_many([Success(a, leases[0][1], 1)])
    assert hot_store.get(after_a).status is TaskState.QUEUED
    assert hot_store.get(both).status is TaskState.BLOCKED
    assert hot_store.get(both).pending_upstreams == 1
    hot_store.complete_many([Success(b, leases[1][1], 2)])
    assert hot_store.get(both).status is TaskState.QUEUED
    assert hot_store.get(both).pending_upstreams == 0


def test_a_retry_is_not_timed_out_by_its_previous_start(hot_store: Store, clock: FakeClock) -> None:
    (task_id,) = submit_n(
        hot_store, 1, timeout_s=1, max_retries=3, backoff_base_s=0.0, backoff_cap_s=0.0
    )
    ((_, lease),) = lease_all(hot_store, [task_id])
    hot_store.start_many([(task_id, lease)])
    hot_store.fail_many([Failure(task_id, lease, "boom")])
    clock.advance(5)
    (grant,) = hot_store.lease_many([(task_id, "n1")], epoch=None)
    assert hot_store.get(task_id).started_at is None
    assert hot_store.timed_out() == []
    hot_store.start_many([(task_id, grant.lease_id)])
    if hot_store.clock is clock:
        clock.advance(2)
        assert hot_store.timed_out() == [(task_id, grant.lease_id, 1.0)]
    assert hot_store.lease_states([task_id]) == {task_id: (TaskState.RUNNING, grant.lease_id)}


@pytest.mark.postgres
def test_relaxed_commits_keep_results_durable(database_url: str, backend: str) -> None:
    """A scheduler's or executor's store commits without waiting for the disk, except the
    transactions that must survive a server crash (a result)."""
    if backend != "postgresql":
        pytest.skip("synchronous_commit is PostgreSQL's")
    store = Store.open(database_url, migrate=False, relaxed_commits=True)
    try:
        with store.transaction() as (connection, _):
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
            store._durable(connection)
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
        with store.transaction() as (connection, _):
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
        (task_id,) = submit_n(store, 1)
        ((_, lease),) = lease_all(store, [task_id])
        assert store.complete_many([Success(task_id, lease, 7)]).committed == [task_id]
        assert store.get(task_id).result == 7
    finally:
        store.close()


def test_behind_pgbouncer_no_statement_is_prepared(
    database_url: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transaction pooling hands each transaction any server connection: with
    TASKRAY_PGBOUNCER set, nothing stays prepared on one, however often it runs."""
    if backend != "postgresql":
        pytest.skip("prepared statements are PostgreSQL's")
    monkeypatch.setenv("TASKRAY_PGBOUNCER", "1")
    store = Store.open(database_url, migrate=False, relaxed_commits=True)
    try:
        for _ in range(8):
            (task_id,) = submit_n(store, 1)
            ((_, lease),) = lease_all(store, [task_id])
            store.start_many([(task_id, lease)])
            store.complete_many([Success(task_id, lease, None)])
            store.ready(10)
        with store.transaction() as (connection, _):
            prepared = connection.exec_driver_sql(
                "SELECT count(*) FROM pg_prepared_statements"
            ).scalar_one()
        assert prepared == 0
    finally:
        store.close()


def test_lease_many_is_fenced_by_the_leader_epoch(hot_store: Store) -> None:
    a, b = submit_n(hot_store, 2)
    epoch = hot_store.acquire_leadership("scheduler-1", ttl_s=15)
    assert epoch is not None
    with pytest.raises(NotLeaderError):
        hot_store.lease_many([(a, "n1")], epoch=epoch + 1)
    assert hot_store.get(a).status is TaskState.QUEUED
    assert hot_store.attempts(a) == []
    # A takeover with a fresh epoch fences the old one.
    newer = hot_store.acquire_leadership("scheduler-1", ttl_s=15, fresh=True)
    assert newer == epoch + 1
    with pytest.raises(NotLeaderError):
        hot_store.lease_many([(a, "n1")], epoch=epoch)
    grants = hot_store.lease_many([(a, "n1"), (b, "n2")], epoch=newer)
    assert [g.task_id for g in grants] == [a, b]
    assert hot_store.get(b).epoch == newer
    # Nothing left to lease: the epoch still holds, and nothing is granted.
    assert hot_store.lease_many([(a, "n1")], epoch=newer) == []


def test_every_grant_clears_the_previous_attempt_s_start(
    hot_store: Store, clock: FakeClock
) -> None:
    """lease, claim and lease_many share the grant: none of them carries an earlier
    attempt's started_at into a new attempt (its timeout would count from there)."""
    (task_id,) = submit_n(hot_store, 1, max_retries=5, backoff_base_s=0.0, backoff_cap_s=0.0)
    for grant in ("claim", "lease", "lease_many"):
        if grant == "claim":
            (lease,) = hot_store.claim(1, node_id="n1")
            lease_id = lease.lease_id
        elif grant == "lease":
            (lease,) = hot_store.lease([LeaseRequest(task_id, "n1")], epoch=None)
            lease_id = lease.lease_id
        else:
            (granted,) = hot_store.lease_many([(task_id, "n1")], epoch=None)
            lease_id = granted.lease_id
        assert hot_store.get(task_id).started_at is None, grant
        hot_store.start_many([(task_id, lease_id)])
        assert hot_store.get(task_id).started_at is not None
        hot_store.fail_many([Failure(task_id, lease_id, "boom")])
        clock.advance(1)
