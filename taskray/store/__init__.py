"""The store layer: every line of SQL, every transaction, the migrations."""

from taskray.store.engine import create_engine, default_database_url, migrate
from taskray.store.store import (
    DEFAULT_LEASE_TTL_S,
    Clock,
    DatabaseClock,
    Leadership,
    Store,
    TransactionalWrite,
)

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "Clock",
    "DatabaseClock",
    "Leadership",
    "Store",
    "TransactionalWrite",
    "create_engine",
    "default_database_url",
    "migrate",
]
