"""The task store: every state change of a task, each one transaction.

Every transition is a conditional UPDATE whose WHERE names the state (and,
for a leased task, the lease) it leaves, so a stale writer changes nothing and
is told so. Time comes from ``clock`` (the database clock unless a test injects
one) and is passed into SQL as a parameter.

The two backends share this code. Where PostgreSQL gets its own SQL (bulk
insert in one round trip, claims with ``FOR UPDATE SKIP LOCKED``), the method
says why; SQLite runs the portable path, which is safe there because every
transaction takes the single write lock up front (``BEGIN IMMEDIATE``).

``Store`` is assembled here from one mixin per concern:

- ``base``: engine, clock, transactions, row converters, the fence (``_fenced``,
  ``_transition``), notifications and listeners
- ``submit``: submit, submit_many, dependencies, idempotency, bulk insert
- ``queries``: reads, counts, queue statistics, the ready queue
- ``leasing``: lease, claim, the leader-epoch check
- ``hot_path``: the batched path every task takes (ready, lease_many, start_many,
  heartbeat_many, complete_many, fail_many) and what the scheduler's services read
- ``transitions``: start, heartbeat, complete, fail, cancel, reap, downstream effects
- ``dead_letter``: list_dead, replay, purge
- ``keys``: API keys
- ``leadership``: the scheduler leader lease
- ``functions``: functions shipped by value
"""

from __future__ import annotations

from taskray.store.base import (
    DEFAULT_LEADER_NAME,
    DEFAULT_LEASE_TTL_S,
    LIVE,
    Clock,
    DatabaseClock,
    StoreBase,
    TransactionalWrite,
)
from taskray.store.dead_letter import DeadLetterMixin
from taskray.store.functions import FunctionsMixin
from taskray.store.hot_path import HotPathMixin
from taskray.store.keys import API_KEY_PREFIX, API_SCOPES, ApiKey, KeysMixin
from taskray.store.leadership import Leadership, LeadershipMixin
from taskray.store.notifications import DONE_CHANNEL, WORK_CHANNEL, WorkListener
from taskray.store.queries import QueriesMixin, QueueStats
from taskray.store.submit import SubmitMixin

__all__ = [
    "API_KEY_PREFIX",
    "API_SCOPES",
    "DEFAULT_LEADER_NAME",
    "DEFAULT_LEASE_TTL_S",
    "DONE_CHANNEL",
    "LIVE",
    "WORK_CHANNEL",
    "ApiKey",
    "Clock",
    "DatabaseClock",
    "Leadership",
    "QueueStats",
    "Store",
    "StoreBase",
    "TransactionalWrite",
    "WorkListener",
]


class Store(
    HotPathMixin,
    SubmitMixin,
    QueriesMixin,
    DeadLetterMixin,
    KeysMixin,
    LeadershipMixin,
    FunctionsMixin,
):
    """Durable task storage on PostgreSQL or SQLite."""
