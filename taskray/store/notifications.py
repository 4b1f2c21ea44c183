"""Wake-ups through the database: PostgreSQL LISTEN/NOTIFY, a short poll on SQLite.

A notification carries no data (payload ''); it only says "look again". It is sent
inside the transaction that makes the change, so PostgreSQL delivers it at commit and
only then: a listener never wakes for a change it cannot see yet.
"""

from __future__ import annotations

import threading
from typing import Protocol

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Connection

from taskray.errors import StoreUnavailableError

#: PostgreSQL channel that tells schedulers new work is ready (submit, release, replay).
WORK_CHANNEL = "taskray_work"
#: PostgreSQL channel that tells waiters tasks have finished (reached a terminal state):
#: complete, a failure or reap that dead-letters, cancel, and the ``upstream_failed``
#: cascade (which only ever follows one of those, or a submit under a failed upstream).
DONE_CHANNEL = "taskray_done"


class WorkListener(Protocol):
    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s``; True when notified on the listener's channel."""
        ...

    def close(self) -> None: ...


def notify(connection: Connection, channel: str) -> None:
    """Notify ``channel`` at commit (PostgreSQL only: SQLite has no notifications, and its
    listeners poll). PostgreSQL folds repeats of one (channel, payload) within a
    transaction into one delivery."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": channel})


class _PollingListener:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._closed = threading.Event()

    def wait(self, timeout_s: float) -> bool:
        # No notifications on SQLite: waking after a short interval makes the caller poll.
        self._closed.wait(max(0.0, min(timeout_s, self.interval_s)))
        return False

    def close(self) -> None:
        self._closed.set()


class _PostgresListener:
    """LISTEN on one channel over a connection of its own (autocommit, outside the pool)."""

    def __init__(self, url: sa.URL, channel: str) -> None:
        libpq_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            self._connection = psycopg.connect(libpq_url, autocommit=True)
        except psycopg.OperationalError:
            raise StoreUnavailableError("cannot open a listening connection to the store") from None
        self._connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def wait(self, timeout_s: float) -> bool:
        woke = False
        for _ in self._connection.notifies(timeout=max(0.0, timeout_s), stop_after=1):
            woke = True
        if woke:
            # Fold a burst of notifications into one wake-up.
            for _ in self._connection.notifies(timeout=0.0):
                pass
        return woke

    def close(self) -> None:
        self._connection.close()


def open_listener(url: sa.URL, channel: str, poll_interval_s: float) -> WorkListener:
    """A listener on ``channel`` for a PostgreSQL ``url``, else a short poll."""
    if url.get_backend_name() == "postgresql":
        return _PostgresListener(url, channel)
    return _PollingListener(poll_interval_s)
