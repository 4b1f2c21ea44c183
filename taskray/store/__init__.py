"""The store layer: every line of SQL, every transaction, the migrations."""

from taskray.store.engine import create_engine, default_database_url, migrate
from taskray.store.store import (
    API_SCOPES,
    DEFAULT_LEASE_TTL_S,
    DONE_CHANNEL,
    WORK_CHANNEL,
    ApiKey,
    Clock,
    DatabaseClock,
    Leadership,
    QueueStats,
    Store,
    TransactionalWrite,
)

__all__ = [
    "API_SCOPES",
    "DEFAULT_LEASE_TTL_S",
    "DONE_CHANNEL",
    "WORK_CHANNEL",
    "ApiKey",
    "QueueStats",
    "Clock",
    "DatabaseClock",
    "Leadership",
    "Store",
    "TransactionalWrite",
    "create_engine",
    "default_database_url",
    "migrate",
]
