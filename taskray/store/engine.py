"""Database engines for both backends, and the migrations that build their schema."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from platformdirs import user_data_dir
from sqlalchemy.engine import URL, Engine, make_url

from taskray.errors import InvalidTaskError, MigrationError

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported only where migrations run: an executor process checks the schema
# revision with one SELECT, and importing alembic would add about a second to every new
# worker process's first task.

#: The schema revision this taskray needs: the head of ``migrations/versions`` (a test
#: checks the two agree).
SCHEMA_REVISION = "0004"

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: PostgreSQL advisory lock key that serialises concurrent migrations ("taskray" in ASCII).
_MIGRATION_LOCK_KEY = 0x7461736B726179


def default_database_url() -> str:
    """``TASKRAY_DATABASE_URL``, else a SQLite file under the user's data directory."""
    url = os.environ.get("TASKRAY_DATABASE_URL")
    if url:
        return url
    data_dir = Path(user_data_dir("taskray", appauthor=False))
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data_dir / 'taskray.db'}"


def normalise_url(url: str | URL) -> URL:
    """Accept ``postgresql://`` and ``postgres://`` and use the psycopg 3 driver for them."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise InvalidTaskError(
            f"unsupported database {parsed.get_backend_name()!r}: use postgresql:// or sqlite://"
        )
    return parsed


def redacted(url: str | URL) -> str:
    """The URL with its password hidden, for logs and messages."""
    return make_url(url).render_as_string(hide_password=True)


def create_engine(url: str | URL, *, relaxed_commits: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``url``. With ``relaxed_commits`` (PostgreSQL) a commit returns before
    its WAL reaches the disk (``synchronous_commit=off``), unless the transaction asks for a
    durable commit itself (``Store._durable``): for the scheduler and the executors, whose
    every write but a result can be lost in a server crash without harm (see
    ``StoreBase.relaxed_commits``)."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, **kwargs)
    options: dict[str, Any] = {}
    connect_args = dict(kwargs.pop("connect_args", {}))
    if os.environ.get("TASKRAY_PGBOUNCER", "").lower() in ("1", "true", "transaction"):
        # Behind PgBouncer in transaction pooling mode a server connection changes between
        # transactions: no statement may stay prepared on one (psycopg prepares a statement
        # after its fifth run on a connection unless told not to).
        connect_args["prepare_threshold"] = None
    if relaxed_commits:
        connect_args["options"] = "-c synchronous_commit=off"
    if connect_args:
        options["connect_args"] = connect_args
    if "poolclass" not in kwargs:
        options.update(pool_size=5, max_overflow=10)
    options.update(
        {
            # The store names every transaction's isolation itself; READ COMMITTED plus
            # row locks is what the claim path (SKIP LOCKED) is designed for.
            "isolation_level": "READ COMMITTED",
        }
    )
    options.update(kwargs)
    engine = sa.create_engine(parsed, **options)
    if not options.get("pool_pre_ping"):
        _ping_when_idle(engine)
    return engine


#: A pooled connection left idle longer than this is checked (one round trip) before it is
#: used again: a database restart cuts connections while they sit in the pool. One in
#: steady use is not (a ping per transaction would cost a fifth of a short one's time):
#: if the server went away under it, its first statement fails and the caller retries,
#: as every caller of the store does on ``StoreUnavailableError``.
IDLE_PING_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    @sa.event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("checked_in_at")
        if since is None or time.monotonic() - since < IDLE_PING_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool drops this connection and checks out a fresh one.
            raise sa.exc.DisconnectionError() from exc


def _sqlite_engine(url: URL, **kwargs: Any) -> Engine:
    database = url.database or ""
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url, connect_args={"check_same_thread": False, "timeout": 30.0}, **kwargs
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that "begin" below
        # can open every transaction as IMMEDIATE: the write lock is taken up front, so
        # two writers queue on busy_timeout instead of failing mid-transaction with
        # "database is locked" when a read lock cannot be upgraded.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        raw = connection.connection.dbapi_connection
        assert raw is not None
        if connection.get_execution_options().get(READ_ONLY):
            # WAL readers never wait for the writer: a read takes no lock up front.
            raw.execute("BEGIN")
            return
        _begin_immediate(raw)

    return engine


#: Execution option of a connection whose transaction only reads (SQLite: no write lock).
READ_ONLY = "taskray_read_only"
#: Longest wait for SQLite's write lock before giving up (as busy_timeout did).
SQLITE_LOCK_WAIT_S = 30.0


def _begin_immediate(raw: Any) -> None:
    """Take SQLite's write lock, retrying every fraction of a millisecond while another
    process holds it. SQLite's own busy handler sleeps in steps that grow to 50-100 ms, so a
    writer would wait far longer than the few milliseconds the lock is held (the executors,
    the scheduler and the SDK all write in short transactions)."""
    raw.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + SQLITE_LOCK_WAIT_S
        pause = 0.0002
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 1.5, 0.005)
    finally:
        raw.execute("PRAGMA busy_timeout=30000")


def _alembic_config(connection: sa.Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The head of the migration scripts (reads them; ``SCHEMA_REVISION`` is the constant)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision``; safe to run from several processes at once."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        from alembic import command

        command.upgrade(_alembic_config(connection), revision)


def check_schema(engine: Engine) -> None:
    """Raise ``MigrationError`` unless the schema is at the head revision."""
    current, head = current_revision(engine), SCHEMA_REVISION
    if current != head:
        raise MigrationError(
            f"database schema is at revision {current or 'none'}, this taskray needs {head}: "
            "run `taskray db upgrade`",
            current=current,
            head=head,
        )
