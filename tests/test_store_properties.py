"""Property-based tests of the store: random histories checked against a reference model.

A ``RuleBasedStateMachine`` drives random sequences of submits (single tasks and DAG
batches with upstreams inside the batch and among earlier tasks, repeated idempotency
keys), leases (claim and lease, with and without a node), start, heartbeat, complete,
fail (retryable or not), reap, cancel, replay and clock advances on a ``FakeClock``.
Every fenced call is also made with stale leases (finished, superseded or expired) and
with leases that never existed: those must raise ``LeaseLostError`` and change nothing.

The machine keeps a small reference model of every task and, after every step, checks
the database against it and against the invariants of DESIGN.md:

1. no task is lost, and idempotency keys deduplicate;
2. never two live leases on one task; attempts are numbered 1..n;
3. a result is committed once, and only by the live lease;
4. a task is released exactly when all its upstreams succeeded, and fails when one fails.

Both backends run through the ``make_store``/``clock`` fixtures; the database is emptied
between examples.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from taskray.errors import (
    CycleError,
    InvalidStateError,
    InvalidTaskError,
    LeaseLostError,
    UnknownTaskError,
)
from taskray.models import (
    FAILED_STATES,
    AttemptOutcome,
    Failure,
    LeaseRequest,
    Success,
    Task,
    TaskSpec,
    TaskState,
)
from taskray.store import Store
from taskray.store.tables import metadata, task_attempts, task_edges, tasks
from taskray.testing import FakeClock, make_spec


class HandlerError(Exception):
    """Raised by a handler's own write inside ``complete``."""


START = datetime(2030, 1, 1, tzinfo=UTC)
TENANTS = ("acme", "umbrella")
#: "k1".."k3" are shared by every batch of a tenant; "new1", "new2" are new to each batch.
IDEMPOTENCY_KEYS = (None, None, "k1", "k2", "k3", "new1", "new2")
NODES = (None, "node-a", "node-b")
LEASE_TTLS = (None, 5.0, 60.0)  # None: the store's default
DEFAULT_TTL_S = 30.0
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 3.0
LIVE = frozenset({TaskState.LEASED, TaskState.RUNNING})
#: The executor's fenced calls, as replayed with old leases.
OPS = ("start", "heartbeat", "complete", "fail", "fail_fatal")

MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=100,
    deadline=None,
    # The explain phase traces every line executed, which costs minutes on a failure here.
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


# -- what to submit ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One spec of a batch, before ids exist.

    ``name`` is the spec's batch key; ``after`` names upstreams in the same batch; ``on``
    picks upstreams among the tenant's earlier tasks, counting back from the newest.
    """

    name: str
    idempotency_key: str | None
    max_retries: int
    delay_s: float
    priority: int
    after: tuple[str, ...]
    on: tuple[int, ...]


@st.composite
def batches(draw: st.DrawFn) -> tuple[Plan, ...]:
    """A DAG of 1-4 specs; a batch key may name a spec before or after it in the batch.

    One idempotency key may repeat within the batch: the first spec holding it (in batch
    order) stores the task and the others return it. A spec that waits, directly or not, on
    another spec with its own key would wait on itself, so such a spec gets no key.
    """
    n = draw(st.integers(1, 4))
    keys: list[str | None] = draw(
        st.lists(st.sampled_from(IDEMPOTENCY_KEYS), min_size=n, max_size=n)
    )
    repeated = [k for k in dict.fromkeys(keys) if k is not None and keys.count(k) > 1]
    for k in repeated[1:]:
        keys[keys.index(k) + 1 :] = [None if x == k else x for x in keys[keys.index(k) + 1 :]]
    rank = draw(st.permutations(range(n)))
    after: list[list[int]] = []
    for i in range(n):
        allowed = [j for j in range(n) if rank[j] < rank[i]]
        after.append(draw(st.lists(st.sampled_from(allowed), max_size=2)) if allowed else [])
    # Transitive upstreams, in rank order (upstreams first).
    below: dict[int, set[int]] = {}
    for i in sorted(range(n), key=lambda i: rank[i]):
        below[i] = set(after[i]).union(*(below[j] for j in after[i]))
    original = list(keys)
    for i in range(n):
        if keys[i] is not None and any(original[j] == keys[i] for j in below[i]):
            keys[i] = None
    return tuple(
        Plan(
            name=f"s{i}",
            idempotency_key=keys[i],
            max_retries=draw(st.integers(0, 2)),
            delay_s=draw(st.sampled_from((0.0, 0.0, 10.0))),
            priority=draw(st.sampled_from((0, 0, 5))),
            after=tuple(f"s{j}" for j in after[i]),
            on=tuple(draw(st.lists(st.integers(0, 8), max_size=1))),
        )
        for i in range(n)
    )


def spec_for(tenant: str, plan: Plan, on: list[uuid.UUID], task_id: uuid.UUID) -> TaskSpec:
    return make_spec(
        id=task_id,
        tenant=tenant,
        key=plan.name,
        idempotency_key=plan.idempotency_key,
        max_retries=plan.max_retries,
        backoff_base_s=BACKOFF_BASE_S,
        backoff_cap_s=BACKOFF_CAP_S,
        jitter=0.0,
        delay_s=plan.delay_s,
        priority=plan.priority,
        depends_on=[*plan.after, *on],
    )


def backoff_s(retry_number: int) -> float:
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** (retry_number - 1))


# -- the reference model -------------------------------------------------------------------------


@dataclass
class ModelAttempt:
    lease_id: uuid.UUID
    node_id: str | None
    leased_at: datetime
    started_at: datetime | None = None
    worker_id: str | None = None
    finished_at: datetime | None = None
    outcome: AttemptOutcome | None = None


@dataclass
class ModelTask:
    id: uuid.UUID
    tenant: str
    idempotency_key: str | None
    priority: int
    max_retries: int
    upstreams: frozenset[uuid.UUID]
    status: TaskState
    scheduled_at: datetime
    attempts: list[ModelAttempt] = field(default_factory=list)
    #: Attempts made before the last replay; retries count from here.
    replayed: int = 0
    lease_id: uuid.UUID | None = None
    lease_expires_at: datetime | None = None
    node_id: str | None = None
    #: (lease, result) of every complete call the store accepted.
    commits: list[tuple[uuid.UUID, Any]] = field(default_factory=list)


@dataclass
class Snapshot:
    tasks: dict[uuid.UUID, dict[str, Any]]
    attempts: dict[uuid.UUID, list[dict[str, Any]]]
    edges: dict[uuid.UUID, set[uuid.UUID]]


def read_database(store: Store) -> Snapshot:
    with store.engine.connect() as connection:
        rows = {r["id"]: dict(r) for r in connection.execute(sa.select(tasks)).mappings()}
        attempts: dict[uuid.UUID, list[dict[str, Any]]] = defaultdict(list)
        query = sa.select(task_attempts).order_by(task_attempts.c.task_id, task_attempts.c.attempt)
        for r in connection.execute(query).mappings():
            attempts[r["task_id"]].append(dict(r))
        edges: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
        for up, down in connection.execute(sa.select(task_edges)):
            edges[down].add(up)
    return Snapshot(rows, dict(attempts), dict(edges))


def empty_database(store: Store) -> None:
    with store.engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(sa.delete(table))


class StoreMachine(RuleBasedStateMachine):
    tasks = Bundle("tasks")
    #: (task id, lease id) of every lease ever granted: most of them go stale.
    leases = Bundle("leases")

    def __init__(self, store: Store, clock: FakeClock) -> None:
        super().__init__()
        self.store = store
        self.clock = clock
        empty_database(store)
        clock.set(START)
        self.model: dict[uuid.UUID, ModelTask] = {}
        self.order: dict[str, list[uuid.UUID]] = {t: [] for t in TENANTS}
        self.keys: dict[tuple[str, str], uuid.UUID] = {}
        self._cached: Snapshot | None = None
        self.ids = random.Random(0)
        self.batches = 0

    # -- helpers ---------------------------------------------------------------------------------

    def db(self) -> Snapshot:
        if self._cached is None:
            self._cached = read_database(self.store)
        return self._cached

    def changing(self) -> datetime:
        """Called first by every rule: the database is about to change; returns now."""
        self._cached = None
        return self.clock.now()

    def holds(self, task_id: uuid.UUID, lease_id: uuid.UUID, states: frozenset[TaskState]) -> bool:
        m = self.model[task_id]
        return (
            m.lease_id == lease_id
            and m.status in states
            and m.lease_expires_at is not None
            and m.lease_expires_at > self.clock.now()
        )

    def refused(
        self, call: Callable[[], object], error: type[Exception] | tuple[type[Exception], ...]
    ) -> None:
        """``call`` must raise ``error`` and leave every row as it was."""
        before = read_database(self.store)
        with pytest.raises(error):
            call()
        after = read_database(self.store)
        assert after.tasks == before.tasks
        assert after.attempts == before.attempts
        assert after.edges == before.edges

    def unchanged(self, call: Callable[[], Task]) -> Task:
        """``call`` must succeed and leave every row as it was."""
        before = read_database(self.store)
        returned = call()
        after = read_database(self.store)
        assert after.tasks == before.tasks
        assert after.attempts == before.attempts
        return returned

    def settle(self) -> None:
        """Dependency rules of the reference model, applied until nothing changes."""
        changed = True
        while changed:
            changed = False
            for m in self.model.values():
                ups = [self.model[u].status for u in m.upstreams]
                failed = any(s in FAILED_STATES for s in ups)
                waiting = any(s is not TaskState.SUCCEEDED for s in ups)
                new = m.status
                if m.status is TaskState.BLOCKED and failed:
                    new = TaskState.UPSTREAM_FAILED
                elif m.status is TaskState.BLOCKED and not waiting:
                    new = TaskState.QUEUED
                elif m.status is TaskState.UPSTREAM_FAILED and not failed:
                    # Only after a replay: an upstream is no longer failed.
                    new = TaskState.BLOCKED if waiting else TaskState.QUEUED
                if new is not m.status:
                    m.status = new
                    changed = True

    def finish_attempt(self, m: ModelTask, outcome: AttemptOutcome) -> None:
        attempt = m.attempts[-1]
        assert attempt.lease_id == m.lease_id and attempt.finished_at is None
        attempt.finished_at = self.clock.now()
        attempt.outcome = outcome

    def failed(self, m: ModelTask, retryable: bool, outcome: AttemptOutcome) -> None:
        self.finish_attempt(m, outcome)
        made = len(m.attempts) - m.replayed
        if not retryable or made > m.max_retries:
            m.status = TaskState.DEAD
        else:
            m.status = TaskState.QUEUED
            m.scheduled_at = self.clock.now() + timedelta(seconds=backoff_s(made))
        m.lease_id = None
        m.lease_expires_at = None

    def granted(
        self,
        lease_task: Task,
        lease_id: uuid.UUID,
        expires: datetime,
        node: str | None,
        ttl: float | None,
    ) -> None:
        now = self.clock.now()
        m = self.model[lease_task.id]
        assert expires == now + timedelta(seconds=DEFAULT_TTL_S if ttl is None else ttl)
        m.status = TaskState.LEASED
        m.lease_id = lease_id
        m.lease_expires_at = expires
        m.node_id = node
        m.attempts.append(ModelAttempt(lease_id, node, now))
        assert lease_task.status is TaskState.LEASED
        assert lease_task.lease_id == lease_id
        assert lease_task.node_id == node
        assert lease_task.attempt == len(m.attempts)

    def ready(self) -> list[ModelTask]:
        now = self.clock.now()
        due = [
            m for m in self.model.values() if m.status is TaskState.QUEUED and m.scheduled_at <= now
        ]
        return sorted(due, key=lambda m: (-m.priority, m.scheduled_at, m.id))

    # -- submit ----------------------------------------------------------------------------------

    @initialize(target=tasks, plans=batches())
    def seed(self, plans: tuple[Plan, ...]) -> Any:
        """Every run starts with something to work on."""
        return self.submit("acme", plans)

    @rule(target=tasks, tenant=st.sampled_from(TENANTS), plans=batches())
    def submit(self, tenant: str, plans: tuple[Plan, ...]) -> Any:
        """Submit one spec (``store.submit``) or a batch (``submit_many``)."""
        now = self.changing()
        self.batches += 1
        plans = tuple(
            replace(p, idempotency_key=f"{p.idempotency_key}.{self.batches}")
            if p.idempotency_key and p.idempotency_key.startswith("new")
            else p
            for p in plans
        )
        earlier = self.order[tenant]
        outside = [[earlier[-1 - i % len(earlier)] for i in p.on] if earlier else [] for p in plans]
        # Ids are chosen here, from a seeded generator, so that a run replays exactly (the
        # claim order breaks ties by id).
        specs = [
            spec_for(tenant, p, on, uuid.UUID(int=self.ids.getrandbits(128)))
            for p, on in zip(plans, outside, strict=True)
        ]
        results = (
            [self.store.submit(specs[0])] if len(specs) == 1 else self.store.submit_many(specs)
        )
        assert len(results) == len(specs)

        # The reference. A key the tenant used before returns that task; a key repeated in
        # the batch is stored by its first spec in batch order and returned to the others.
        # The specs that store a task go in, upstreams first.
        index = {p.name: i for i, p in enumerate(plans)}
        ids: dict[int, uuid.UUID] = {}
        alias: dict[int, int] = {}
        for i, p in enumerate(plans):
            if p.idempotency_key is None:
                continue
            if (tenant, p.idempotency_key) in self.keys:
                ids[i] = self.keys[(tenant, p.idempotency_key)]
            else:
                alias[i] = next(
                    j for j in range(i + 1) if plans[j].idempotency_key == p.idempotency_key
                )
        storing = [i for i in range(len(plans)) if i not in ids and alias.get(i, i) == i]
        new: list[uuid.UUID] = []
        while storing:
            i = next(
                i
                for i in storing
                if all(alias.get(index[a], index[a]) in ids for a in plans[i].after)
            )
            storing.remove(i)
            plan, task = plans[i], results[i].task
            assert not results[i].deduplicated, (
                f"{plan.name} is the first spec of the batch with idempotency key "
                f"{plan.idempotency_key!r}, so it stores the task, yet it came back as a repeat"
            )
            upstreams = frozenset(
                {ids[alias.get(index[a], index[a])] for a in plan.after} | set(outside[i])
            )
            states = [self.model[u].status for u in upstreams]
            if any(s in FAILED_STATES for s in states):
                status = TaskState.UPSTREAM_FAILED
            elif any(s is not TaskState.SUCCEEDED for s in states):
                status = TaskState.BLOCKED
            else:
                status = TaskState.QUEUED
            assert task.id == specs[i].id and task.id not in self.model
            assert task.status is status, (plan, task.status, status)
            assert task.tenant == tenant and task.attempt == 0
            assert task.scheduled_at == now + timedelta(seconds=plan.delay_s)
            self.model[task.id] = ModelTask(
                id=task.id,
                tenant=tenant,
                idempotency_key=plan.idempotency_key,
                priority=plan.priority,
                max_retries=plan.max_retries,
                upstreams=upstreams,
                status=status,
                scheduled_at=task.scheduled_at,
            )
            if plan.idempotency_key is not None:
                self.keys[(tenant, plan.idempotency_key)] = task.id
            ids[i] = task.id
            new.append(task.id)
        for i, result in enumerate(results):
            first = ids[alias.get(i, i)]
            if first != specs[i].id:
                # A repeat: the first task, as it stands now, and flagged as deduplicated.
                assert result.deduplicated, f"s{i} repeats a key, yet was not deduplicated"
                assert result.task.id == first, f"s{i} repeats a key, yet got another task"
                assert result.task.status is self.model[first].status
        self.order[tenant].extend(new)
        return multiple(*new)

    @rule(
        kind=st.sampled_from(
            (
                "cycle",
                "duplicate_batch_key",
                "unknown_upstream",
                "unknown_batch_key",
                "cross_tenant_upstream",
                "cross_tenant_batch_key",
                "forged_start",
                "forged_heartbeat",
                "forged_complete",
                "forged_fail",
                "replay_not_dead",
            )
        ),
        pick=st.integers(0, 8),
        idempotency_key=st.sampled_from((None, "k1", "fresh")),
    )
    def bad_input(self, kind: str, pick: int, idempotency_key: str | None) -> None:
        """Bad input is refused with a typed error and changes nothing: a bad batch (nothing
        of it lands), a lease id never granted, a replay of a task that is not dead."""
        self.changing()
        everyone = [*self.order["acme"], *self.order["umbrella"]]
        some_task = everyone[-1 - pick % len(everyone)] if everyone else uuid.uuid4()
        forged = uuid.uuid4()
        fenced: dict[str, Callable[[], object]] = {
            "forged_start": lambda: self.store.start(some_task, forged),
            "forged_heartbeat": lambda: self.store.heartbeat(some_task, forged),
            "forged_complete": lambda: self.store.complete(some_task, forged, "forged"),
            "forged_fail": lambda: self.store.fail(some_task, forged, "forged"),
        }
        if kind in fenced:
            self.refused(fenced[kind], LeaseLostError)
            return
        if kind == "replay_not_dead":
            live = [t for t in everyone if self.model[t].status is not TaskState.DEAD]
            if live:
                task = live[-1 - pick % len(live)]
                self.refused(lambda: self.store.replay([task]), InvalidStateError)
            return
        good = make_spec(tenant="acme", key="good", idempotency_key=idempotency_key)
        theirs = self.order["umbrella"]
        if kind == "cross_tenant_upstream" and not theirs:
            kind = "unknown_upstream"
        error: type[Exception] | tuple[type[Exception], ...] = UnknownTaskError
        if kind == "cycle":
            bad = [make_spec(key="a", depends_on=["b"]), make_spec(key="b", depends_on=["a"])]
            error = CycleError
        elif kind == "duplicate_batch_key":
            bad = [make_spec(key="good")]
            error = InvalidTaskError
        elif kind == "unknown_upstream":
            bad = [make_spec(tenant="acme", depends_on=[uuid.uuid4()])]
        elif kind == "unknown_batch_key":
            bad = [make_spec(tenant="acme", depends_on=["no-such-key"])]
        elif kind == "cross_tenant_upstream":
            bad = [make_spec(tenant="acme", depends_on=[theirs[-1 - pick % len(theirs)]])]
        else:
            # Dependencies never cross tenants, whether named by id or by batch key.
            bad = [make_spec(tenant="umbrella", depends_on=["good"])]
            error = (UnknownTaskError, InvalidTaskError)
        self.refused(lambda: self.store.submit_many([good, *bad]), error)

    # -- leases ----------------------------------------------------------------------------------

    @rule(
        target=leases,
        limit=st.integers(1, 3),
        node=st.sampled_from(NODES),
        ttl=st.sampled_from(LEASE_TTLS),
    )
    def claim(self, limit: int, node: str | None, ttl: float | None) -> Any:
        """Claim the ready tasks in order: priority, then scheduled_at, then id."""
        self.changing()
        # The read API agrees with the reference too.
        counts = Counter(m.status for m in self.model.values())
        assert self.store.count_by_status() == counts
        ready = [m.id for m in self.ready()]
        assert [t.id for t in self.store.candidates(100)] == ready[:100]
        queued = [m.scheduled_at for m in self.model.values() if m.status is TaskState.QUEUED]
        assert self.store.next_scheduled_at() == (min(queued) if queued else None)
        expected = ready[:limit]
        got = self.store.claim(limit, node_id=node, ttl_s=ttl)
        assert [g.task.id for g in got] == expected
        for g in got:
            self.granted(g.task, g.lease_id, g.expires_at, node, ttl)
        return multiple(*[(g.task.id, g.lease_id) for g in got])

    @rule(
        target=leases,
        task=tasks,
        other=tasks,
        node=st.sampled_from(NODES),
        ttl=st.sampled_from(LEASE_TTLS),
    )
    def lease(self, task: uuid.UUID, other: uuid.UUID, node: str | None, ttl: float | None) -> Any:
        """Lease chosen tasks: only those queued and due are granted, in the order asked."""
        self.changing()
        wanted = list(dict.fromkeys([task, other]))
        now = self.clock.now()
        expected = [
            t
            for t in wanted
            if self.model[t].status is TaskState.QUEUED and self.model[t].scheduled_at <= now
        ]
        got = self.store.lease([LeaseRequest(t, node) for t in wanted], epoch=None, ttl_s=ttl)
        assert [g.task.id for g in got] == expected
        for g in got:
            self.granted(g.task, g.lease_id, g.expires_at, node, ttl)
        return multiple(*[(g.task.id, g.lease_id) for g in got])

    # -- execution, fenced by the lease --------------------------------------------------------
    #
    # The executor's calls, each made three ways: by the current holder of a lease (``start``
    # ... ``fail``: the pick-th most recently leased live task with its lease, which may
    # have expired meanwhile), with any lease ever granted (``replay_lease``: most are
    # stale), and with the stale leases that matter most (``stale_lease``). The reference
    # decides which calls must succeed; the rest must raise LeaseLostError and change nothing.

    def do_start(self, task_id: uuid.UUID, lease_id: uuid.UUID, worker: str | None) -> None:
        now = self.clock.now()
        if self.holds(task_id, lease_id, frozenset({TaskState.RUNNING})):
            # Started already under this lease (a retry whose reply was lost): returned as
            # it is, and nothing changes.
            self.unchanged(lambda: self.store.start(task_id, lease_id, worker_id=worker))
            return
        if not self.holds(task_id, lease_id, frozenset({TaskState.LEASED})):
            self.refused(
                lambda: self.store.start(task_id, lease_id, worker_id=worker), LeaseLostError
            )
            return
        task = self.store.start(task_id, lease_id, worker_id=worker)
        m = self.model[task_id]
        m.status = TaskState.RUNNING
        m.attempts[-1].started_at = now
        m.attempts[-1].worker_id = worker
        assert task.status is TaskState.RUNNING and task.started_at == now

    def do_heartbeat(self, task_id: uuid.UUID, lease_id: uuid.UUID, ttl: float | None) -> None:
        now = self.clock.now()
        if not self.holds(task_id, lease_id, LIVE):
            self.refused(lambda: self.store.heartbeat(task_id, lease_id, ttl_s=ttl), LeaseLostError)
            return
        expires = self.store.heartbeat(task_id, lease_id, ttl_s=ttl)
        assert expires == now + timedelta(seconds=DEFAULT_TTL_S if ttl is None else ttl)
        self.model[task_id].lease_expires_at = expires

    def do_complete(self, task_id: uuid.UUID, lease_id: uuid.UUID, result: Any) -> None:
        m = self.model[task_id]
        if m.status is TaskState.SUCCEEDED and m.commits[0][0] == lease_id:
            # Committed already under this lease (a retry whose reply was lost): reported
            # as committed, with the first result, and nothing changes.
            task = self.unchanged(lambda: self.store.complete(task_id, lease_id, result))
            assert task.result == m.commits[0][1]
            return
        if not self.holds(task_id, lease_id, LIVE):
            self.refused(lambda: self.store.complete(task_id, lease_id, result), LeaseLostError)
            return
        task = self.store.complete(task_id, lease_id, result)
        m = self.model[task_id]
        m.commits.append((lease_id, result))
        self.finish_attempt(m, AttemptOutcome.SUCCEEDED)
        m.status = TaskState.SUCCEEDED
        m.lease_expires_at = None
        self.settle()
        assert task.status is TaskState.SUCCEEDED and task.result == result

    def do_fail(self, task_id: uuid.UUID, lease_id: uuid.UUID, retryable: bool) -> None:
        now = self.clock.now()
        if not self.holds(task_id, lease_id, LIVE):
            self.refused(
                lambda: self.store.fail(task_id, lease_id, "boom", retryable=retryable),
                LeaseLostError,
            )
            return
        task = self.store.fail(task_id, lease_id, "boom", retryable=retryable)
        m = self.model[task_id]
        self.failed(m, retryable, AttemptOutcome.FAILED)
        self.settle()
        # The retry rule: back in the queue after its backoff, or dead once retries are spent.
        made = task.attempt - m.replayed
        if retryable and made <= task.max_retries:
            assert task.status is TaskState.QUEUED
            assert task.scheduled_at >= now
            assert task.scheduled_at == now + timedelta(seconds=backoff_s(made))
        else:
            assert task.status is TaskState.DEAD
        assert task.lease_id is None and task.lease_expires_at is None

    def holder(self, pick: int) -> tuple[uuid.UUID, uuid.UUID] | None:
        """The pick-th most recently leased live task and its lease (None if none is live)."""
        live = sorted(
            (m for m in self.model.values() if m.status in LIVE),
            key=lambda m: m.attempts[-1].leased_at,
        )
        if not live:
            return None
        m = live[-1 - pick % len(live)]
        assert m.lease_id is not None
        return m.id, m.lease_id

    @rule(pick=st.integers(0, 3), worker=st.sampled_from((None, "worker-1")))
    def start(self, pick: int, worker: str | None) -> None:
        self.changing()
        if held := self.holder(pick):
            self.do_start(*held, worker)

    @rule(pick=st.integers(0, 3), ttl=st.sampled_from(LEASE_TTLS))
    def heartbeat(self, pick: int, ttl: float | None) -> None:
        self.changing()
        if held := self.holder(pick):
            self.do_heartbeat(*held, ttl)

    @rule(pick=st.integers(0, 3), result=st.sampled_from((None, 7, "ok", {"rows": [1, 2]})))
    def complete(self, pick: int, result: Any) -> None:
        self.changing()
        if held := self.holder(pick):
            self.do_complete(*held, result)

    @rule(pick=st.integers(0, 3), retryable=st.booleans())
    def fail(self, pick: int, retryable: bool) -> None:
        self.changing()
        if held := self.holder(pick):
            self.do_fail(*held, retryable)

    @rule(
        target=leases,
        node=st.sampled_from(NODES),
        outcome=st.sampled_from(
            ("complete", "complete", "fail", "fail_fatal", "crash", "write_fails")
        ),
    )
    def execute(self, node: str | None, outcome: str) -> Any:
        """An executor's whole turn: claim the next ready task, start it, then complete it,
        fail it, crash (its lease runs out), or complete with a handler write that raises
        (the result must roll back with it)."""
        self.changing()
        expected = [m.id for m in self.ready()[:1]]
        got = self.store.claim(1, node_id=node)
        assert [g.task.id for g in got] == expected
        for g in got:
            self.granted(g.task, g.lease_id, g.expires_at, node, None)
            self.do_start(g.task.id, g.lease_id, "worker-1")
            if outcome == "complete":
                self.do_complete(g.task.id, g.lease_id, {"by": node})
            elif outcome == "write_fails":
                self.complete_with_failing_write(g.task.id, g.lease_id)
            elif outcome != "crash":
                self.do_fail(g.task.id, g.lease_id, retryable=outcome == "fail")
        return multiple(*[(g.task.id, g.lease_id) for g in got])

    def complete_with_failing_write(self, task_id: uuid.UUID, lease_id: uuid.UUID) -> None:
        def write(connection: sa.Connection) -> None:
            connection.execute(sa.update(tasks).values(priority=tasks.c.priority + 1))
            raise HandlerError("the handler's own write failed")

        self.refused(lambda: self.store.complete(task_id, lease_id, 1, write=write), HandlerError)

    def call_with(self, task_id: uuid.UUID, lease_id: uuid.UUID, op: str) -> None:
        if op == "start":
            self.do_start(task_id, lease_id, "worker-2")
        elif op == "heartbeat":
            self.do_heartbeat(task_id, lease_id, None)
        elif op == "complete":
            self.do_complete(task_id, lease_id, "late")
        else:
            self.do_fail(task_id, lease_id, retryable=op == "fail")

    @rule(lease=leases, op=st.sampled_from(OPS))
    def replay_lease(self, lease: tuple[uuid.UUID, uuid.UUID], op: str) -> None:
        """A call with a lease granted earlier: stale once its attempt ended or it expired."""
        self.changing()
        self.call_with(*lease, op)

    @rule(pick=st.integers(0, 3), op=st.sampled_from(OPS))
    def stale_lease(self, pick: int, op: str) -> None:
        """The stale calls that matter most, sought out: a lease that ran out while its task
        still looks live (not reaped yet), and an old lease of a task leased again since."""
        self.changing()
        stale = self.stale_pairs()
        if stale:
            task_id, lease_id = stale[-1 - pick % len(stale)]
            self.call_with(task_id, lease_id, op)

    def stale_pairs(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Leases that ran out while their task still looks live, and old leases of tasks
        leased again since."""
        now = self.clock.now()
        stale = [
            (m.id, m.lease_id)
            for m in self.model.values()
            if m.status in LIVE and m.lease_expires_at is not None and m.lease_expires_at <= now
        ]
        stale += [
            (m.id, a.lease_id)
            for m in self.model.values()
            if m.status in LIVE
            for a in m.attempts[:-1]
        ]
        return [(t, lease) for t, lease in stale if lease is not None]

    @rule(picks=st.lists(st.integers(0, 7), min_size=1, max_size=5), op=st.sampled_from(OPS))
    def batch(self, picks: list[int], op: str) -> None:
        """The executor's batched calls (start_many ... fail_many) with live and stale leases
        mixed in one batch: the fence is per row, so exactly the live ones commit and the
        stale ones are refused, named, and change nothing."""
        self.changing()
        now = self.clock.now()
        live = [held for pick in range(4) if (held := self.holder(pick)) is not None]
        candidates = live + self.stale_pairs()
        if not candidates:
            return
        chosen: dict[uuid.UUID, uuid.UUID] = {}
        for pick in picks:
            task_id, lease_id = candidates[pick % len(candidates)]
            chosen.setdefault(task_id, lease_id)
        pairs = list(chosen.items())
        expected = [t for t, lease in pairs if self.holds(t, lease, LIVE)]
        # A start of a task running under that lease already (a retry whose reply was lost)
        # reports it started, and changes nothing.
        again = {t for t in expected if op == "start" and self.model[t].status is TaskState.RUNNING}
        refused_rows = {t for t, lease in pairs if t not in expected}
        before = read_database(self.store)
        if op == "start":
            started = self.store.start_many(pairs, worker_id="worker-3")
            committed, refused = [t.id for t in started.tasks], started.refused
        elif op == "heartbeat":
            renewed = self.store.heartbeat_many(pairs)
            committed, refused = renewed.committed, renewed.refused
        elif op == "complete":
            done = self.store.complete_many([Success(t, lease, {"batch": 1}) for t, lease in pairs])
            committed, refused = done.committed, done.refused
        else:
            after_fail = self.store.fail_many(
                [Failure(t, lease, "boom", retryable=op == "fail") for t, lease in pairs]
            )
            committed = [t for t, state in after_fail.items() if state is not None]
            refused = [t for t, state in after_fail.items() if state is None]
        assert committed == expected
        assert refused == [t for t, _ in pairs if t in refused_rows]
        after = read_database(self.store)
        for task_id in refused_rows | again:
            assert after.tasks[task_id] == before.tasks[task_id]
        for task_id in committed:
            m = self.model[task_id]
            lease_id = chosen[task_id]
            if task_id in again:
                continue
            if op == "start":
                m.status = TaskState.RUNNING
                m.attempts[-1].started_at = now
                m.attempts[-1].worker_id = "worker-3"
            elif op == "heartbeat":
                m.lease_expires_at = now + timedelta(seconds=DEFAULT_TTL_S)
            elif op == "complete":
                m.commits.append((lease_id, {"batch": 1}))
                self.finish_attempt(m, AttemptOutcome.SUCCEEDED)
                m.status = TaskState.SUCCEEDED
                m.lease_expires_at = None
            else:
                self.failed(m, op == "fail", AttemptOutcome.FAILED)
        self.settle()

    @rule()
    def reap(self) -> None:
        now = self.changing()
        expired = {
            m.id
            for m in self.model.values()
            if m.status in LIVE and m.lease_expires_at is not None and m.lease_expires_at <= now
        }
        reaped = self.store.reap()
        assert {t.id for t in reaped} == expired
        for t in reaped:
            self.failed(self.model[t.id], True, AttemptOutcome.LEASE_EXPIRED)
            assert t.status is self.model[t.id].status
        self.settle()

    @rule(seconds=st.sampled_from((1.0, 2.0, 5.0, 25.0, 30.0, 31.0, 61.0)))
    def advance(self, seconds: float) -> None:
        self.changing()
        self.clock.advance(seconds)

    # -- cancel and replay -----------------------------------------------------------------------

    @rule(task=tasks)
    def cancel(self, task: uuid.UUID) -> None:
        self.changing()
        m = self.model[task]
        if m.status.is_terminal:
            self.refused(lambda: self.store.cancel(task), InvalidStateError)
            return
        cancelled = self.store.cancel(task)
        if m.status in LIVE:
            self.finish_attempt(m, AttemptOutcome.CANCELLED)
        m.status = TaskState.CANCELLED
        m.lease_id = None
        m.lease_expires_at = None
        self.settle()
        assert cancelled.status is TaskState.CANCELLED

    @rule(pick=st.integers(0, 8))
    def replay(self, pick: int) -> None:
        """A dead task (the pick-th newest) goes back to the queue with a fresh retry budget;
        its failed downstream tasks wait again."""
        now = self.changing()
        dead = [m for m in self.model.values() if m.status is TaskState.DEAD]
        if not dead:
            return
        m = dead[-1 - pick % len(dead)]
        (replayed,) = self.store.replay([m.id])
        m.status = TaskState.QUEUED
        m.scheduled_at = now
        m.replayed = len(m.attempts)
        self.settle()
        assert replayed.id == m.id and replayed.status is TaskState.QUEUED

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def no_task_is_lost(self) -> None:
        db = self.db()
        # Every accepted task is stored, and nothing else: a repeat stored no second task.
        assert set(db.tasks) == set(self.model)
        now = self.clock.now()
        for task_id, row in db.tasks.items():
            m = self.model[task_id]
            status = TaskState(row["status"])
            assert status is m.status, (task_id, status, m.status)
            assert row["tenant"] == m.tenant
            assert row["idempotency_key"] == m.idempotency_key
            if status is TaskState.QUEUED:
                assert row["scheduled_at"] == m.scheduled_at
            if status in LIVE:
                assert row["lease_expires_at"] == m.lease_expires_at
                assert row["node_id"] == m.node_id
            if status.is_terminal:
                assert row["completed_at"] is not None and row["completed_at"] <= now
            else:
                assert row["completed_at"] is None
        for (tenant, key), task_id in self.keys.items():
            holders = [
                i
                for i, r in db.tasks.items()
                if r["tenant"] == tenant and r["idempotency_key"] == key
            ]
            assert holders == [task_id]

    @invariant()
    def one_live_lease_per_task(self) -> None:
        db = self.db()
        for task_id, row in db.tasks.items():
            m = self.model[task_id]
            attempts = db.attempts.get(task_id, [])
            assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
            assert row["attempt"] == len(attempts) == len(m.attempts)
            open_attempts = [a for a in attempts if a["finished_at"] is None]
            assert len(open_attempts) <= 1
            if TaskState(row["status"]) in LIVE:
                assert len(open_attempts) == 1
                assert open_attempts[0]["lease_id"] == row["lease_id"] == m.lease_id
                assert open_attempts[0]["attempt"] == row["attempt"]
            else:
                assert open_attempts == []
            for a, expected in zip(attempts, m.attempts, strict=True):
                assert a["lease_id"] == expected.lease_id
                assert a["node_id"] == expected.node_id
                assert a["leased_at"] == expected.leased_at
                assert a["started_at"] == expected.started_at
                assert a["worker_id"] == expected.worker_id
                assert a["finished_at"] == expected.finished_at
                outcome = None if a["outcome"] is None else AttemptOutcome(a["outcome"])
                assert outcome is expected.outcome
        leases = [a["lease_id"] for rows in db.attempts.values() for a in rows]
        assert len(leases) == len(set(leases))

    @invariant()
    def results_commit_once_by_the_live_lease(self) -> None:
        db = self.db()
        for task_id, row in db.tasks.items():
            m = self.model[task_id]
            wins = [a for a in db.attempts.get(task_id, []) if a["outcome"] == "succeeded"]
            if row["status"] == TaskState.SUCCEEDED:
                assert len(m.commits) == 1
                lease_id, result = m.commits[0]
                assert [a["lease_id"] for a in wins] == [lease_id]
                assert row["result"] == result
            else:
                assert m.commits == []
                assert wins == []
                assert row["result"] is None

    @invariant()
    def dependents_released_exactly_when_upstreams_succeed(self) -> None:
        db = self.db()
        status = {task_id: TaskState(row["status"]) for task_id, row in db.tasks.items()}
        for task_id, row in db.tasks.items():
            ups = db.edges.get(task_id, set())
            assert ups == self.model[task_id].upstreams
            waiting = [u for u in ups if status[u] is not TaskState.SUCCEEDED]
            failed = [u for u in ups if status[u] in FAILED_STATES]
            state = status[task_id]
            if state is TaskState.BLOCKED:
                assert waiting and not failed
                assert row["pending_upstreams"] == len(waiting)
            elif state in (TaskState.QUEUED, TaskState.SUCCEEDED) or state in LIVE:
                assert not waiting
            elif state is TaskState.UPSTREAM_FAILED:
                assert failed


def test_store_state_machine(
    make_store: Callable[..., Store], clock: FakeClock, backend: str
) -> None:
    store = make_store(clock=clock, rng=random.Random(0))
    assert store.engine.dialect.name == backend
    run_state_machine_as_test(lambda: StoreMachine(store, clock), settings=MACHINE_SETTINGS)
